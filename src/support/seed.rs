//! Realistic registry contents for the rehearsal, the tests and the benchmark. Deterministic: the
//! same spec always produces the same rows, ids included, so run logs can be compared.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use super::ephemeral::EphemeralPostgres;

/// The agent URLs of the known stale profiles: sales agents stored as 'buying'.
pub const BIDCLIQ_URL: &str = "https://bidcliq.example/mcp";
pub const SWIVEL_URL: &str = "https://ads.swivel.example/a2a";
/// A member's own buying agent whose probe could not classify it: must stay 'buying'.
pub const NORTHWIND_URL: &str = "https://dsp.northwind.example/mcp";

const TYPES: [&str; 8] = [
    "sales",
    "creative",
    "signals",
    "governance",
    "buying",
    "measurement",
    "brand",
    "rights",
];

#[derive(Debug, Clone)]
pub struct NewProfile {
    pub id: Uuid,
    pub slug: String,
    pub display_name: String,
    pub agents: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub agent_url: String,
    pub inferred_type: Option<String>,
    pub discovery_error: Option<String>,
    pub oauth_required: bool,
    pub age_hours: i32,
}

impl NewSnapshot {
    pub fn new(agent_url: &str, inferred_type: Option<&str>) -> Self {
        NewSnapshot {
            agent_url: agent_url.to_owned(),
            inferred_type: inferred_type.map(str::to_owned),
            discovery_error: None,
            oauth_required: false,
            age_hours: 30,
        }
    }
}

/// splitmix64: tiny, deterministic, good enough to spread test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Uniform in `0..bound`, as an index.
    pub fn index_below(&mut self, bound: usize) -> usize {
        let bound = u64::try_from(bound).expect("an index bound fits in u64");
        usize::try_from(self.below(bound)).expect("below an index bound is an index")
    }

    pub fn uuid(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next_u64(), self.next_u64())
    }
}

/// Shape of the ordinary profiles around the named ones.
#[derive(Debug, Clone, Copy)]
pub struct BulkSpec {
    pub profiles: usize,
    /// Share of agent URLs with a snapshot, in per mille.
    pub snapshot_per_mille: u64,
    /// Share of snapshots whose probe could not classify the agent, in per mille.
    pub unclassified_per_mille: u64,
    /// Share of agents stored 'buying' while their probe says 'sales', in per mille of agents.
    pub stale_per_mille: u64,
    pub seed: u64,
}

impl BulkSpec {
    /// No stale agents: a registry the rule agrees with everywhere.
    pub fn consistent(profiles: usize, seed: u64) -> Self {
        BulkSpec {
            profiles,
            snapshot_per_mille: 600,
            unclassified_per_mille: 167,
            stale_per_mille: 0,
            seed,
        }
    }
}

/// Generates the ordinary profiles of `spec`, `chunk` profiles at a time.
pub(crate) fn bulk_chunks(
    spec: BulkSpec,
    chunk: usize,
) -> impl Iterator<Item = (Vec<NewProfile>, Vec<NewSnapshot>)> {
    let mut rng = Rng::new(spec.seed);
    let mut made = 0;
    std::iter::from_fn(move || {
        if made >= spec.profiles {
            return None;
        }
        let end = (made + chunk).min(spec.profiles);
        let mut profiles = Vec::with_capacity(end - made);
        let mut snapshots = Vec::new();
        for n in made..end {
            let agent_count = 1 + rng.index_below(5);
            let mut agents = Vec::with_capacity(agent_count);
            for k in 0..agent_count {
                let url = format!("https://agents-{n}-{k}.example.com/mcp");
                let probed = rng.below(1000) < spec.snapshot_per_mille;
                let unclassified = probed && rng.below(1000) < spec.unclassified_per_mille;
                let stale = probed && !unclassified && rng.below(1000) < spec.stale_per_mille;
                let stored = if unclassified || stale {
                    "buying"
                } else {
                    TYPES[rng.index_below(TYPES.len())]
                };
                if probed {
                    let inferred = if unclassified {
                        None
                    } else if stale {
                        Some("sales")
                    } else {
                        Some(stored)
                    };
                    let mut snapshot = NewSnapshot::new(&url, inferred);
                    snapshot.age_hours =
                        i32::try_from(rng.below(24 * 30)).expect("under 720 hours");
                    snapshots.push(snapshot);
                }
                agents.push(json!({
                    "url": url,
                    "type": stored,
                    "name": format!("Agent {k} of member {n}"),
                    "visibility": if rng.below(4) == 0 { "private" } else { "public" },
                }));
            }
            profiles.push(NewProfile {
                id: rng.uuid(),
                slug: format!("member-{n}"),
                display_name: format!("Member {n}"),
                agents: Some(Value::Array(agents)),
            });
        }
        made = end;
        Some((profiles, snapshots))
    })
}

/// The profiles and snapshots every rehearsal has: the two known stale sales agents, a member's
/// own buying agent, and the junk production holds.
pub fn named_fixtures() -> (Vec<NewProfile>, Vec<NewSnapshot>) {
    let mut rng = Rng::new(0xB1DC_11C0);
    let mut profile = |slug: &str, agents: Option<Value>| NewProfile {
        id: rng.uuid(),
        slug: slug.to_owned(),
        display_name: slug.replace('-', " "),
        agents,
    };
    let profiles = vec![
        profile(
            "bidcliq",
            Some(json!([{
                "url": BIDCLIQ_URL, "type": "buying", "name": "BidCliq Sales Agent",
                "visibility": "public"
            }])),
        ),
        profile(
            "swivel",
            Some(json!([
                {"url": "https://creative.swivel.example/mcp", "type": "creative", "name": "Swivel Creative"},
                {
                    "url": SWIVEL_URL, "type": "buying", "name": "Swivel Ads",
                    "visibility": "public", "floor_cpm_micros": 12345678901234567890123u128,
                    "ratio": 0.1, "tags": ["ctv", "audio"], "contact": {"team": "ad ops"}
                }
            ])),
        ),
        profile(
            "northwind-media",
            Some(json!([{
                "url": NORTHWIND_URL, "type": "buying", "name": "Northwind DSP",
                "visibility": "private"
            }])),
        ),
        profile("junk-null-agents", None),
        profile("junk-json-null", Some(Value::Null)),
        profile(
            "junk-object",
            Some(json!({"url": BIDCLIQ_URL, "type": "buying"})),
        ),
        profile("junk-string", Some(json!("https://string.example/mcp"))),
        profile("junk-number", Some(json!(42))),
        profile(
            "junk-elements",
            Some(json!([
                null, 7, "https://bare-string.example", [BIDCLIQ_URL],
                {"name": "no url", "type": "buyer"},
                {"url": null, "type": "sales"},
                {"url": 12, "type": "buyer"},
                {"url": {"href": SWIVEL_URL}, "type": "buying"}
            ])),
        ),
        profile(
            "odd-types",
            Some(json!([
                {"url": "https://odd-1.example/mcp", "type": 3},
                {"url": "https://odd-2.example/mcp", "type": false},
                {"url": "https://odd-3.example/mcp", "type": null},
                {"url": "https://odd-4.example/mcp"}
            ])),
        ),
        profile("no-agents", Some(json!([]))),
    ];
    let mut snapshots = vec![
        NewSnapshot::new(BIDCLIQ_URL, Some("sales")),
        NewSnapshot::new(SWIVEL_URL, Some("sales")),
        NewSnapshot::new("https://creative.swivel.example/mcp", Some("creative")),
        NewSnapshot::new(NORTHWIND_URL, None),
        NewSnapshot::new("https://decoy.example/mcp", Some("signals")),
    ];
    snapshots[3].discovery_error = Some("tools/list timed out".to_owned());
    (profiles, snapshots)
}

/// Inserts organizations, profiles and snapshots with one statement per table.
pub async fn insert(
    pool: &PgPool,
    profiles: &[NewProfile],
    snapshots: &[NewSnapshot],
) -> Result<()> {
    let orgs: Vec<String> = profiles
        .iter()
        .map(|p| format!("org_{}", p.id.simple()))
        .collect();
    let names: Vec<&str> = profiles.iter().map(|p| p.display_name.as_str()).collect();
    let ids: Vec<Uuid> = profiles.iter().map(|p| p.id).collect();
    let slugs: Vec<&str> = profiles.iter().map(|p| p.slug.as_str()).collect();
    // Sent as text so SQL NULL and JSON null stay distinct.
    let agents: Vec<Option<String>> = profiles
        .iter()
        .map(|p| p.agents.as_ref().map(Value::to_string))
        .collect();
    let mut transaction = pool.begin().await.context("could not start seeding")?;
    sqlx::query(
        "INSERT INTO organizations (workos_organization_id, name) \
         SELECT * FROM unnest($1::text[], $2::text[])",
    )
    .bind(&orgs)
    .bind(&names)
    .execute(&mut *transaction)
    .await
    .context("could not seed organizations")?;
    sqlx::query(
        "INSERT INTO member_profiles (id, workos_organization_id, display_name, slug, agents, is_public) \
         SELECT id, org, name, slug, agents::jsonb, true \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) \
              AS s(id, org, name, slug, agents)",
    )
    .bind(&ids)
    .bind(&orgs)
    .bind(&names)
    .bind(&slugs)
    .bind(&agents)
    .execute(&mut *transaction)
    .await
    .context("could not seed member_profiles")?;
    let urls: Vec<&str> = snapshots.iter().map(|s| s.agent_url.as_str()).collect();
    let inferred: Vec<Option<&str>> = snapshots
        .iter()
        .map(|s| s.inferred_type.as_deref())
        .collect();
    let errors: Vec<Option<&str>> = snapshots
        .iter()
        .map(|s| s.discovery_error.as_deref())
        .collect();
    let oauth: Vec<bool> = snapshots.iter().map(|s| s.oauth_required).collect();
    let ages: Vec<i32> = snapshots.iter().map(|s| s.age_hours).collect();
    sqlx::query(
        "INSERT INTO agent_capabilities_snapshot \
             (agent_url, protocol, inferred_type, discovery_error, oauth_required, last_discovered) \
         SELECT url, 'mcp', inferred, error, oauth, now() - make_interval(hours => age) \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int[]) \
              AS s(url, inferred, error, oauth, age)",
    )
    .bind(&urls)
    .bind(&inferred)
    .bind(&errors)
    .bind(&oauth)
    .bind(&ages)
    .execute(&mut *transaction)
    .await
    .context("could not seed agent_capabilities_snapshot")?;
    transaction
        .commit()
        .await
        .context("could not commit the seed")?;
    Ok(())
}

/// The rehearsal registry: the named fixtures among `ordinary` consistent profiles.
pub async fn seed_rehearsal(pool: &PgPool, ordinary: usize) -> Result<()> {
    let (profiles, snapshots) = named_fixtures();
    insert(pool, &profiles, &snapshots).await?;
    seed_bulk(pool, BulkSpec::consistent(ordinary, 20_261_126)).await
}

/// A new, empty database `name` on the throwaway `server`, and a pool of two connections to it.
pub async fn create_database(server: &EphemeralPostgres, name: &str) -> Result<PgPool> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url("postgres"))
        .await
        .context("could not connect to the throwaway server")?;
    // A database name cannot be a bind parameter; `name` is the caller's constant.
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .with_context(|| format!("could not create database '{name}'"))?;
    admin.close().await;
    PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url(name))
        .await
        .with_context(|| format!("could not connect to database '{name}'"))
}

/// The audit rows the tool's runs wrote: what an apply must have added, one per flip.
pub(crate) async fn backfill_audit_rows(pool: &PgPool) -> Result<u64> {
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM type_reclassification_log WHERE source = 'backfill_script'",
    )
    .fetch_one(pool)
    .await
    .context("could not count audit rows")?;
    u64::try_from(rows).context("the server counted fewer than no rows")
}

pub async fn seed_bulk(pool: &PgPool, spec: BulkSpec) -> Result<()> {
    for (profiles, snapshots) in bulk_chunks(spec, 10_000) {
        insert(pool, &profiles, &snapshots).await?;
    }
    Ok(())
}

/// The crawler's own record of the two stale sales agents: one `crawler_promote` row a day for
/// the last five days, as the registry's crawler logs a disagreement it does not promote. The
/// rehearsal seeds them so that its log shows the evidence a staging run shows.
pub(crate) async fn seed_crawler_disagreements(pool: &PgPool) -> Result<()> {
    sqlx::query(
        "INSERT INTO type_reclassification_log \
             (agent_url, old_type, new_type, source, changed_at, notes) \
         SELECT url, 'buying', 'sales', 'crawler_promote', now() - make_interval(days => day), \
                '{\"decision\": \"logged_only_no_promote\"}' \
         FROM unnest($1::text[]) AS url CROSS JOIN generate_series(1, 5) AS day",
    )
    .bind([BIDCLIQ_URL, SWIVEL_URL])
    .execute(pool)
    .await
    .context("could not seed the crawler's disagreements")?;
    Ok(())
}

/// The two roles RUNBOOK.md grants, with exactly its grants: `planner` for the dry-runs (the
/// `--dry-run` grants, and SELECT on the audit table so the crawler's evidence can be read, as
/// `history` and `revert --dry-run` need), `writer` for the apply (the `--apply` grants only).
pub(crate) async fn create_runbook_roles(pool: &PgPool, planner: &str, writer: &str) -> Result<()> {
    for statement in [
        format!("CREATE ROLE {planner} LOGIN"),
        format!("GRANT SELECT ON member_profiles TO {planner}"),
        format!("GRANT SELECT ON agent_capabilities_snapshot TO {planner}"),
        format!("GRANT SELECT ON type_reclassification_log TO {planner}"),
        format!("CREATE ROLE {writer} LOGIN"),
        format!("GRANT SELECT ON member_profiles TO {writer}"),
        format!("GRANT SELECT ON agent_capabilities_snapshot TO {writer}"),
        format!("GRANT UPDATE (agents) ON member_profiles TO {writer}"),
        format!("GRANT INSERT ON type_reclassification_log TO {writer}"),
        format!("GRANT USAGE ON SEQUENCE type_reclassification_log_id_seq TO {writer}"),
    ] {
        sqlx::query(&statement)
            .execute(pool)
            .await
            .with_context(|| format!("could not run '{statement}'"))?;
    }
    Ok(())
}
