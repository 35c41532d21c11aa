//! Every list a run prints is in log order (profile label, then element index) in every format,
//! however the registry stores the rows: flips, held flips, the plan file, and the lines of flips
//! not written at the locked write. And a Markdown ticket keeps held flips out of "Flips", and a
//! revert's Markdown summary counts its conflicts.

use crate::common::{backfill, revert, wait_for_blocked_tool, RunLog, Scratch, TestDb};
use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot};
use serde_json::{json, Value};
use uuid::Uuid;

/// Profiles whose id order (the order planning and writing read them in) is not their label
/// order; within each, urls whose order is not the index order.
const SLUGS: [&str; 5] = ["zulu", "mike", "alpha", "kilo", "bravo"];
/// Probed long ago: held by `--max-probe-age 2d`.
const OLD: [&str; 2] = ["mike", "bravo"];
const ELEMENT_TAGS: [&str; 3] = ["z", "m", "a"];

fn url(slug: &str, index: usize) -> String {
    format!("https://{slug}.example/{}", ELEMENT_TAGS[index])
}

async fn registry() -> TestDb {
    let db = TestDb::new().await;
    let mut profiles = Vec::new();
    let mut snapshots = Vec::new();
    for (n, slug) in SLUGS.iter().enumerate() {
        let agents: Vec<Value> = (0..ELEMENT_TAGS.len())
            .map(|index| json!({"url": url(slug, index), "type": "buying"}))
            .collect();
        profiles.push(NewProfile {
            id: Uuid::from_u128(n as u128 + 1),
            slug: (*slug).to_owned(),
            display_name: (*slug).to_owned(),
            agents: Some(Value::Array(agents)),
        });
        for index in 0..ELEMENT_TAGS.len() {
            let mut snapshot = NewSnapshot::new(&url(slug, index), Some("sales"));
            if OLD.contains(slug) {
                snapshot.age_hours = 24 * 5;
            }
            snapshots.push(snapshot);
        }
    }
    // Inserted in neither id nor label order.
    profiles.swap(0, 3);
    seed::insert(&db.pool, &profiles, &snapshots).await.unwrap();
    db
}

/// `(slug, index)` of a url this registry holds.
fn element(url: &str) -> (String, usize) {
    let rest = url.strip_prefix("https://").unwrap();
    let (slug, tag) = rest.split_once(".example/").unwrap();
    let index = ELEMENT_TAGS.iter().position(|t| *t == tag).unwrap();
    (slug.to_owned(), index)
}

/// The first url on a line of output.
fn url_in(line: &str) -> Option<String> {
    let start = line.find("https://")?;
    let url: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '|')
        .collect();
    Some(url.replace('\\', ""))
}

/// The elements of each kind of line, in the order printed: `flip`, `held`, `skipped`.
fn listed(format: &str, out: &str) -> Vec<(String, (String, usize))> {
    let mut found = Vec::new();
    match format {
        "json" => {
            for event in RunLog::new(out).events() {
                if let Some(flip) = event.flip() {
                    found.push((event.kind().to_owned(), element(&flip.url)));
                }
            }
        }
        "text" => {
            for line in out.lines() {
                let Some(url) = url_in(line) else { continue };
                let kind = match line.split_whitespace().next() {
                    Some("held") => "held",
                    Some("skipped") => "skipped",
                    _ => "flip",
                };
                found.push((kind.to_owned(), element(&url)));
            }
        }
        "markdown" => {
            let mut section = String::new();
            for line in out.lines() {
                if let Some(heading) = line.strip_prefix("### ") {
                    section = heading.to_owned();
                    continue;
                }
                let Some(url) = url_in(line).filter(|_| line.starts_with("| ")) else {
                    continue;
                };
                let kind = match section.as_str() {
                    "Flips" => "flip",
                    "Held (never written)" => "held",
                    "Skipped" => "skipped",
                    other => panic!("a flip row under '{other}':\n{out}"),
                };
                found.push((kind.to_owned(), element(&url)));
            }
        }
        other => unreachable!("{other}"),
    }
    found
}

fn of_kind(found: &[(String, (String, usize))], kind: &str) -> Vec<(String, usize)> {
    found
        .iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, element)| element.clone())
        .collect()
}

fn in_log_order(slugs: &[&str]) -> Vec<(String, usize)> {
    let mut elements: Vec<(String, usize)> = slugs
        .iter()
        .flat_map(|slug| (0..ELEMENT_TAGS.len()).map(|index| ((*slug).to_owned(), index)))
        .collect();
    elements.sort();
    elements
}

const FORMATS: [&str; 3] = ["text", "json", "markdown"];

#[tokio::test]
async fn flips_held_flips_and_the_plan_file_are_in_log_order_in_every_format() {
    let fresh: Vec<&str> = SLUGS.iter().copied().filter(|s| !OLD.contains(s)).collect();
    for format in FORMATS {
        let db = registry().await;
        let scratch = Scratch::new();
        let plan = scratch.join("plan.json");
        let flags = [
            "--dry-run",
            "--max-probe-age",
            "2d",
            "--format",
            format,
            "--plan-out",
            plan.to_str().unwrap(),
        ];
        let (result, out) = backfill(&db.url, &flags).run().await;
        let out = out.text;
        assert!(result.is_err(), "held flips refuse the run: {out}");
        let found = listed(format, &out);
        assert_eq!(
            of_kind(&found, "flip"),
            in_log_order(&fresh),
            "{format}:\n{out}"
        );
        assert_eq!(
            of_kind(&found, "held"),
            in_log_order(&OLD),
            "{format}:\n{out}"
        );

        let file: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
        let in_file: Vec<(String, usize)> = file["flips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|flip| element(flip["url"].as_str().unwrap()))
            .collect();
        assert_eq!(in_file, in_log_order(&SLUGS), "the plan file");
    }
}

#[tokio::test]
async fn flips_not_written_at_the_locked_write_are_listed_in_log_order_in_every_format() {
    for format in FORMATS {
        let db = registry().await;
        let mut holder = db.lock_profiles(&SLUGS).await;
        let flags = [
            "--apply",
            "--max-flips",
            "100",
            "--batch-size",
            "2",
            "--lock-timeout",
            "120s",
            "--format",
            format,
        ];
        let apply = tokio::spawn(backfill(&db.url, &flags).run());
        wait_for_blocked_tool(&db).await;
        // Every probe now says creative: each planned flip changed, each element has a new one.
        sqlx::query("UPDATE agent_capabilities_snapshot SET inferred_type = 'creative'")
            .execute(&mut holder)
            .await
            .unwrap();
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        let (result, out) = apply.await.unwrap();
        let out = out.text;
        assert_eq!(result.unwrap().written, 0, "{out}");
        let skipped = of_kind(&listed(format, &out), "skipped");
        let expected: Vec<(String, usize)> = in_log_order(&SLUGS)
            .into_iter()
            .flat_map(|element| [element.clone(), element])
            .collect();
        assert_eq!(skipped, expected, "{format}:\n{out}");
    }
}

#[tokio::test]
async fn a_markdown_ticket_lists_as_flips_exactly_what_would_be_written() {
    let db = registry().await;
    let flags = ["--apply", "--max-probe-age", "2d", "--format", "markdown"];
    let (result, out) = backfill(&db.url, &flags).run().await;
    let out = out.text;
    assert!(result.is_err(), "held flips refuse the apply");
    let found = listed("markdown", &out);
    let fresh: Vec<&str> = SLUGS.iter().copied().filter(|s| !OLD.contains(s)).collect();
    assert_eq!(of_kind(&found, "flip"), in_log_order(&fresh), "{out}");
    assert_eq!(of_kind(&found, "held"), in_log_order(&OLD), "{out}");
    assert_eq!(
        out.matches("### Flips").count(),
        1,
        "one Flips table:\n{out}"
    );

    // Without the guard every flip is writable, and the ticket's Flips are what the apply writes.
    let flags = ["--apply", "--max-flips", "100", "--format", "markdown"];
    let (summary, out) = backfill(&db.url, &flags).run().await;
    let (summary, out) = (summary.unwrap(), out.text);
    let flips = of_kind(&listed("markdown", &out), "flip");
    assert_eq!(flips, in_log_order(&SLUGS), "{out}");
    assert_eq!(summary.written, flips.len() as u64);
    assert!(!out.contains("### Held"), "{out}");
}

/// The Markdown summary row of revert conflicts.
fn conflicts_row(out: &str) -> Option<String> {
    out.lines()
        .find(|line| line.starts_with("| conflicts (changed since run) |"))
        .map(str::to_owned)
}

#[tokio::test]
async fn a_reverts_markdown_summary_counts_its_conflicts() {
    let db = registry().await;
    let (applied, log) = backfill(&db.url, &["--apply", "--max-flips", "100"])
        .run()
        .await;
    applied.unwrap();
    let run_id = log.run_id();
    // Members change three of the fifteen elements since the run.
    db.member_sets_type("kilo", 0, "creative").await;
    db.member_sets_type("zulu", 2, "signals").await;
    db.member_sets_type("alpha", 1, "brand").await;
    for mode in ["--dry-run", "--apply"] {
        let flags = [&run_id, mode, "--max-flips", "100", "--format", "markdown"];
        let (reverted, out) = revert(&db.url, &flags).run().await;
        reverted.unwrap();
        let out = out.text;
        assert_eq!(
            conflicts_row(&out).as_deref(),
            Some("| conflicts (changed since run) | 3 |"),
            "{mode}:\n{out}"
        );
        let skipped = of_kind(&listed("markdown", &out), "skipped");
        assert_eq!(
            skipped,
            [("alpha".into(), 1), ("kilo".into(), 0), ("zulu".into(), 2)],
            "{mode}: the conflicts, in log order:\n{out}"
        );
    }
}
