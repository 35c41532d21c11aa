//! Progress on stderr, drawn only when stderr is a terminal: the stdout report is the same
//! either way.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar over `total` profiles with rate and ETA.
pub fn bar(total: usize, message: &'static str) -> ProgressBar {
    on_terminal(
        Some(u64::try_from(total).unwrap_or(u64::MAX)),
        "{msg} {wide_bar} {human_pos}/{human_len} profiles, {per_sec}, eta {eta}",
        message,
    )
}

/// A bar over an estimated `total` of profiles with rate and ETA; a count with the elapsed time
/// when there is no estimate. The caller stretches the length when the estimate was short.
pub fn profiles(estimate: Option<u64>, message: &'static str) -> ProgressBar {
    match estimate {
        Some(total) => on_terminal(
            Some(total),
            "{msg} {wide_bar} {percent}% {human_pos}/~{human_len} profiles, {per_sec}, eta {eta}",
            message,
        ),
        None => on_terminal(None, "{msg} {human_pos} profiles ({elapsed})", message),
    }
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
