//! The knobs (environment variables) and the binary under test.

use super::*;

/// The binary under test and how it is started.
pub(crate) struct Tool<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) scratch: &'a Path,
    pub(crate) cpu: &'a ServerCpu,
    pub(crate) launcher: std::sync::Mutex<Launcher>,
}

pub(crate) struct Config {
    pub(crate) profiles: usize,
    pub(crate) seed: u64,
    pub(crate) stale_per_mille: u64,
    pub(crate) rounds: usize,
    pub(crate) batch_size: Option<u32>,
    /// BENCH_CHUNK_SIZE: the dry-runs' `--chunk-size` (the tool's default when unset).
    pub(crate) chunk_size: Option<usize>,
    pub(crate) sweep: Vec<u32>,
    pub(crate) sweep_rounds: usize,
    pub(crate) c_every: usize,
    pub(crate) c_rounds: usize,
    pub(crate) apply_flips: usize,
    pub(crate) apply_rounds: usize,
    pub(crate) bin: PathBuf,
    pub(crate) diagnose: Vec<Vec<String>>,
    /// BENCH_BOUNDS=0 skips the lower bounds of a keyset plan (runs.rs `BOUNDS`).
    pub(crate) bounds: bool,
}

pub(crate) fn env_or<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|error| anyhow::anyhow!("{name}={text:?} is not valid: {error}")),
        _ => Ok(default),
    }
}

impl Config {
    pub(crate) fn from_env() -> Result<Self> {
        let profiles: usize = env_or("BENCH_PROFILES", 1_000_000)?;
        ensure!(profiles >= 10, "BENCH_PROFILES must be at least 10");
        let rounds = env_or("BENCH_ROUNDS", 3)?;
        let sweep = std::env::var("BENCH_BATCH_SWEEP").unwrap_or_else(|_| "1000,5000,10000".into());
        let sweep = sweep
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| part.trim().parse::<u32>().context("BENCH_BATCH_SWEEP"))
            .collect::<Result<Vec<_>>>()?;
        let batch_size = match std::env::var("BENCH_BATCH_SIZE") {
            Ok(text) if !text.trim().is_empty() => {
                Some(text.trim().parse().context("BENCH_BATCH_SIZE")?)
            }
            _ => None,
        };
        // One pass of the per-profile script costs minutes at a million profiles; alternate it
        // every round only while it stays cheap.
        let c_rounds_default = if profiles <= 200_000 { rounds } else { 1 };
        Ok(Config {
            profiles,
            seed: env_or("BENCH_SEED", 20_261_126)?,
            stale_per_mille: env_or("BENCH_STALE_PER_MILLE", 2)?,
            rounds,
            batch_size,
            chunk_size: match std::env::var("BENCH_CHUNK_SIZE") {
                Ok(text) if !text.trim().is_empty() => {
                    Some(text.trim().parse().context("BENCH_CHUNK_SIZE")?)
                }
                _ => None,
            },
            sweep,
            sweep_rounds: env_or("BENCH_SWEEP_ROUNDS", 2)?,
            c_every: env_or("BENCH_C_EVERY", 1usize)?.max(1),
            c_rounds: env_or("BENCH_C_ROUNDS", c_rounds_default)?.min(rounds),
            apply_flips: env_or("BENCH_APPLY_FLIPS", 1000)?,
            apply_rounds: env_or("BENCH_APPLY_ROUNDS", 3)?,
            bin: std::env::var_os("BENCH_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agent-type-backfill"))),
            diagnose: std::env::var("BENCH_DIAGNOSE")
                .unwrap_or_default()
                .split(';')
                .map(|prefix| prefix.split_whitespace().map(str::to_owned).collect())
                .filter(|prefix: &Vec<String>| !prefix.is_empty())
                .collect(),
            bounds: env_or("BENCH_BOUNDS", 1u8)? != 0,
        })
    }

    pub(crate) fn batch_args(&self) -> Vec<String> {
        let mut args: Vec<String> = self
            .batch_size
            .map(|size| vec!["--batch-size".to_owned(), size.to_string()])
            .unwrap_or_default();
        if let Some(size) = self.chunk_size {
            args.extend(["--chunk-size".to_owned(), size.to_string()]);
        }
        args
    }
}

pub(crate) fn knobs() -> String {
    let set: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("BENCH_") && name != "BENCH_PROFILES")
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    if set.is_empty() {
        "defaults".into()
    } else {
        set.join(" ")
    }
}
