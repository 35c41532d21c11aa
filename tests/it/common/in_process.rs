//! The backfill and `revert` run in this process, through the library's entry points as `main`
//! calls them, with the command line's own flags: the same builder shape as [`super::Tool`] for
//! the binary, for the tests that need the typed `Summary`, a stop signal they raise themselves,
//! or to run beside a test that holds a lock.

use agent_type_backfill::cli::{Cli, Command};
use agent_type_backfill::config::{BackfillConfig, RevertConfig};
use agent_type_backfill::events::Summary;
use agent_type_backfill::interrupt::StopSignal;
use agent_type_backfill::report;
use clap::Parser;

use super::{Dump, RunLog, TestDb};

enum Which {
    Backfill,
    Revert,
}

/// One in-process run, built like a command line.
pub struct InProcess {
    which: Which,
    flags: Vec<String>,
    url: String,
    stop: StopSignal,
    /// [`InProcess::writes_nothing`]: the database the run must leave as it was.
    unchanged: Option<String>,
}

/// The backfill with these flags against `url`; its log is JSON unless the flags name a format.
pub fn backfill(url: &str, flags: &[&str]) -> InProcess {
    InProcess::new(Which::Backfill, url, flags)
}

/// `revert` with these flags (the run id first) against `url`; its log is JSON unless the flags
/// name a format.
pub fn revert(url: &str, flags: &[&str]) -> InProcess {
    InProcess::new(Which::Revert, url, flags)
}

impl InProcess {
    fn new(which: Which, url: &str, flags: &[&str]) -> InProcess {
        let mut flags: Vec<String> = flags.iter().map(|flag| (*flag).to_owned()).collect();
        if !flags.iter().any(|flag| flag == "--format") {
            flags.extend(["--format".to_owned(), "json".to_owned()]);
        }
        InProcess {
            which,
            flags,
            url: url.to_owned(),
            stop: StopSignal::never(),
            unchanged: None,
        }
    }

    /// Stops the run when `stop` is raised, as a signal would.
    pub fn stop(mut self, stop: StopSignal) -> InProcess {
        self.stop = stop;
        self
    }

    /// The run must leave every row of `db` as it was: its end fails the test otherwise, showing
    /// the rows it changed, its log and its result.
    pub fn writes_nothing(mut self, db: &TestDb) -> InProcess {
        self.unchanged = Some(db.url.clone());
        self
    }

    /// Runs to the end: the run's result and its log.
    pub async fn run(self) -> (anyhow::Result<Summary>, RunLog) {
        let before = match &self.unchanged {
            Some(url) => Some(Dump::of(url).await),
            None => None,
        };
        let mut out = Vec::new();
        let result = match self.which {
            Which::Backfill => {
                let mut argv = vec!["agent-type-backfill".to_owned()];
                argv.extend(self.flags.iter().cloned());
                argv.extend(["--database-url".to_owned(), self.url.clone()]);
                let args = Cli::try_parse_from(argv)
                    .expect("valid test flags")
                    .backfill;
                let config = BackfillConfig::from_cli(&args).expect("a database url is set");
                let mut printer = report::printer(config.run.format, &mut out);
                agent_type_backfill::backfill::execute(&config, printer.as_mut(), self.stop).await
            }
            Which::Revert => {
                let mut argv = vec!["agent-type-backfill".to_owned(), "revert".to_owned()];
                argv.extend(self.flags.iter().cloned());
                argv.extend(["--database-url".to_owned(), self.url.clone()]);
                let Some(Command::Revert(args)) =
                    Cli::try_parse_from(argv).expect("valid test flags").command
                else {
                    unreachable!("parsed a revert command line")
                };
                let config = RevertConfig::from_cli(&args).expect("a database url is set");
                let mut printer = report::printer(config.run.format, &mut out);
                agent_type_backfill::audit::revert(&config, printer.as_mut(), self.stop).await
            }
        };
        let log = RunLog::new(String::from_utf8(out).expect("the log is UTF-8"));
        if let (Some(before), Some(url)) = (before, &self.unchanged) {
            let what = format!("{:?}: {result:?}\n--- log\n{}", self.flags, log.text);
            before.assert_same(&Dump::of(url).await, &what);
        }
        (result, log)
    }
}

/// `writes_nothing` is an expectation that can fail: a run that writes fails it, naming a row.
#[tokio::test]
#[should_panic(expected = "the run was to write nothing, and changed these rows:\n- (")]
async fn an_apply_that_writes_fails_writes_nothing() {
    let db = TestDb::seeded(0).await;
    backfill(&db.url, &["--apply"])
        .writes_nothing(&db)
        .run()
        .await
        .0
        .unwrap();
}
