//! The commands in README.md and RUNBOOK.md work when pasted as printed. Operators copy them at
//! 3 a.m.; a block that runs into the next paragraph once created files named after its words.

use std::path::Path;
use std::process::Command;

use crate::common::{Scratch, TestDb, BIN};

/// An indented code block of a Markdown file, dedented, with the line it starts on.
struct Block {
    line: usize,
    text: String,
}

/// The indented code blocks of `markdown` (four spaces, or six inside a list item), each begun
/// after a blank line. Fenced blocks hold log examples, not commands.
fn indented_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, usize, Vec<String>)> = None;
    let mut previous_blank = true;
    let mut fenced = false;
    for (number, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let indent = line.len() - line.trim_start().len();
        let blank = line.trim().is_empty();
        match &mut current {
            Some((_, depth, lines)) if !blank && indent >= *depth => {
                lines.push(line[*depth..].to_owned());
            }
            Some(_) if blank => {}
            Some(_) => {
                let (start, _, lines) = current.take().unwrap();
                blocks.push(Block {
                    line: start,
                    text: lines.join("\n"),
                });
            }
            None => {}
        }
        let opens = current.is_none()
            && !fenced
            && previous_blank
            && !blank
            && (indent == 4 || indent == 6)
            && !line.trim_start().starts_with("- ");
        if opens {
            current = Some((number + 1, indent, vec![line[indent..].to_owned()]));
        }
        previous_blank = blank;
    }
    if let Some((start, _, lines)) = current {
        blocks.push(Block {
            line: start,
            text: lines.join("\n"),
        });
    }
    blocks
}

/// Whether a block is shell, by its first word: SQL grants and queries, and log excerpts, are not.
fn is_shell(block: &Block) -> bool {
    let first = block.text.split_whitespace().next().unwrap_or_default();
    let first = first.trim_start_matches('(');
    [
        "agent-type-backfill",
        "cargo",
        "export",
        "npm",
        "cd",
        "scripts/pg-matrix",
        "apt-get",
    ]
    .contains(&first)
        // An assignment: `PG_BIN=... cargo`, `RUN_ID=atb-...`.
        || first
            .split_once('=')
            .is_some_and(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
}

fn shell_blocks() -> Vec<(&'static str, Block)> {
    let mut found = Vec::new();
    for file in ["README.md", "RUNBOOK.md"] {
        let text = std::fs::read_to_string(file).unwrap();
        for block in indented_blocks(&text) {
            if is_shell(&block) {
                found.push((file, block));
            }
        }
    }
    found
}

#[test]
fn every_shell_command_in_the_docs_parses_with_bash() {
    let blocks = shell_blocks();
    assert!(
        blocks.len() >= 10,
        "found only {} shell blocks",
        blocks.len()
    );
    for (file, block) in blocks {
        let parsed = Command::new("bash")
            .args(["-n", "-c", &block.text])
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{file}:{}: bash -n says {}:\n{}",
            block.line,
            String::from_utf8_lossy(&parsed.stderr),
            block.text
        );
    }
}

/// A block's commands: its lines, with backslash continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        match line.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// The files a command says it creates: what `tee`, `--plan-out` and redirections name.
fn named_files(command: &str) -> Vec<String> {
    let words: Vec<&str> = command
        .split(|c: char| c.is_whitespace() || c == ')' || c == '(')
        .filter(|word| !word.is_empty())
        .collect();
    let mut named = Vec::new();
    for pair in words.windows(2) {
        if ["tee", "--plan-out", ">", "2>"].contains(&pair[0]) {
            named.push(pair[1].trim_matches('\'').to_owned());
        }
    }
    named
}

/// Every RUNBOOK command that runs the tool, in the runbook's order, pasted into bash as printed
/// with only what an operator fills in substituted (the URL, the database name, and the values
/// of the variables the RUNBOOK has them set: the reviewed count, the run id), against a seeded
/// registry: each exits as the runbook says (0 on this
/// registry, whose two flips are the expected kind) and creates no file but those it names.
#[tokio::test]
async fn the_runbooks_commands_run_as_printed_and_create_only_the_files_they_name() {
    let db = TestDb::seeded(20).await;
    let scratch = Scratch::new();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let runbook = std::fs::read_to_string("RUNBOOK.md").unwrap();
    let mut run_id: Option<String> = None;
    let mut ran = 0;
    for block in indented_blocks(&runbook) {
        if !is_shell(&block) || !block.text.contains("agent-type-backfill ") {
            continue;
        }
        if block.text.starts_with("cargo ") || block.text.contains(" rehearse") {
            continue;
        }
        for command in logical_lines(&block.text) {
            let script = command
                .trim()
                .replace(" registry ", &format!(" {} ", db.name));
            if !command.trim_start().starts_with("agent-type-backfill") {
                continue;
            }
            let before: Vec<_> = scratch.leftovers("");
            let done = Command::new("bash")
                .args(["-o", "pipefail", "-c", &script])
                .current_dir(&scratch.0)
                .env("PATH", &path)
                .env("DATABASE_URL", &db.url)
                // What the operator sets as the RUNBOOK says, from what the seeded registry
                // shows: two flips, and the apply's run id.
                .env("REVIEWED_COUNT", "2")
                .env("REVERT_COUNT", "2")
                .env("RUN_ID", run_id.as_deref().unwrap_or("(no apply yet)"))
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&done.stdout);
            let stderr = String::from_utf8_lossy(&done.stderr);
            assert_eq!(
                done.status.code(),
                Some(0),
                "RUNBOOK.md:{}:\n{script}\n{stdout}\n{stderr}",
                block.line
            );
            let named = named_files(&script);
            for created in scratch.leftovers("") {
                let created = created.to_string_lossy().into_owned();
                let new = !before.iter().any(|old| old.to_string_lossy() == created);
                assert!(
                    !new || named.contains(&created),
                    "RUNBOOK.md:{}: created {created:?}, which the command does not name:\n{script}",
                    block.line
                );
            }
            if script.contains("--apply") && !script.contains("revert") {
                run_id = stdout
                    .lines()
                    .find_map(|line| line.trim().strip_prefix("audit run id:"))
                    .map(|id| id.trim().to_owned())
                    .filter(|id| id.starts_with("atb-"))
                    .or(run_id);
            }
            ran += 1;
        }
    }
    assert!(ran >= 6, "ran only {ran} RUNBOOK commands");
    assert!(run_id.is_some(), "no RUNBOOK apply wrote anything");
}
