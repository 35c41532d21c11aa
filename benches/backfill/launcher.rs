//! The launcher: a small re-exec of the bench that starts the timed binary and reads its rusage.

use super::*;

pub(crate) const LAUNCHER_FLAG: &str = "--spawn-and-measure";

/// A small re-exec of this bench that starts the timed binary and reports its `wait4` rusage.
///
/// Linux folds the high-water RSS of the address space a process had before `exec` into its
/// `ru_maxrss`, and a `fork`/`vfork` child starts from its parent's. Spawned straight from this
/// process, the tool would report the bench's own peak (seeding, the script's `SELECT *`) as its
/// peak RSS. The launcher stays a few MiB, so what it reports is the tool's own peak.
pub(crate) struct Launcher {
    pub(crate) child: std::process::Child,
    pub(crate) requests: std::process::ChildStdin,
    pub(crate) replies: std::io::BufReader<std::process::ChildStdout>,
}

impl Launcher {
    pub(crate) fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("could not find the bench executable")?;
        let mut child = Command::new(exe)
            .arg(LAUNCHER_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("could not start the launcher")?;
        let requests = child.stdin.take().context("launcher stdin")?;
        let replies = std::io::BufReader::new(child.stdout.take().context("launcher stdout")?);
        Ok(Launcher {
            child,
            requests,
            replies,
        })
    }

    pub(crate) fn run(&mut self, request: &Value) -> Result<Value> {
        use std::io::{BufRead, Write};
        writeln!(self.requests, "{request}").context("the launcher is gone")?;
        self.requests.flush()?;
        let mut reply = String::new();
        self.replies.read_line(&mut reply)?;
        let reply: Value = serde_json::from_str(&reply).context("the launcher is gone")?;
        if let Some(error) = reply["error"].as_str() {
            bail!("launcher: {error}");
        }
        Ok(reply)
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        drop(self.requests);
        self.child.wait()?;
        Ok(())
    }
}

pub(crate) fn launcher_main() -> Result<()> {
    use std::io::{BufRead, Write};
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let request: Value = serde_json::from_str(&line?)?;
        let reply = launch(&request)
            .unwrap_or_else(|error| serde_json::json!({"error": format!("{error:#}")}));
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

pub(crate) fn launch(request: &Value) -> Result<Value> {
    let strings = |key: &str| -> Vec<String> {
        request[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let argv = strings("argv");
    let env = strings("env");
    let (program, args) = argv.split_first().context("empty argv")?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(
            request["stdout"].as_str().context("stdout")?,
        )?)
        .stderr(fs::File::create(
            request["stderr"].as_str().context("stderr")?,
        )?);
    for pair in env.chunks(2) {
        command.env(&pair[0], &pair[1]);
    }
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("could not start {program:?}"))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid does not fit pid_t")?;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error.into());
        }
    }
    let wall = started.elapsed();
    drop(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok(serde_json::json!({
        "code": code,
        "status": status,
        "wall_ns": nanos(wall),
        "max_rss_kib": usage.ru_maxrss,
        "user_ns": nanos(timeval(usage.ru_utime)),
        "system_ns": nanos(timeval(usage.ru_stime)),
    }))
}
