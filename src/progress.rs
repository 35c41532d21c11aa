//! Progress on stderr, drawn only when stderr is a terminal: the stdout report is the same
//! either way.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner with the elapsed time, for a step whose progress the server does not report.
pub fn spinner(message: String) -> ProgressBar {
    let spinner = on_terminal(None, "{spinner} {msg} ({elapsed})", message);
    if !spinner.is_hidden() {
        spinner.enable_steady_tick(Duration::from_millis(200));
    }
    spinner
}

/// A bar over `total` profiles with rate and ETA.
pub fn bar(total: usize, message: &'static str) -> ProgressBar {
    on_terminal(
        Some(u64::try_from(total).unwrap_or(u64::MAX)),
        "{msg} {wide_bar} {human_pos}/{human_len} profiles, {per_sec}, eta {eta}",
        message,
    )
}

fn on_terminal(
    length: Option<u64>,
    template: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template).expect("static progress template is valid"),
    );
    bar.set_message(message);
    bar
}
