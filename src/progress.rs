//! Progress on stderr, drawn only when stderr is a terminal: the stdout report is the same
//! either way.

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::IsTerminal;

/// A bar over `total` profiles with rate and ETA.
pub(crate) fn bar(total: usize, message: &'static str) -> ProgressBar {
    on_terminal(
        Some(crate::domain::count(total)),
        "{msg} {wide_bar} {human_pos}/{human_len} profiles, {rate}, eta {eta}",
        message,
    )
}

/// A bar over an estimated `total` of profiles with rate and ETA; a count with the elapsed time
/// when there is no estimate. The caller stretches the length when the estimate was short.
pub(crate) fn profiles(estimate: Option<u64>, message: &'static str) -> ProgressBar {
    match estimate {
        Some(total) => on_terminal(
            Some(total),
            "{msg} {wide_bar} {percent}% {human_pos}/~{human_len} profiles, {rate}, eta {eta}",
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
        ProgressStyle::with_template(template)
            .expect("static progress template is valid")
            // indicatif's own `{per_sec}` prints four decimals (`11,276.2119/s`).
            .with_key(
                "rate",
                |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{}/s", HumanCount(rounded(state.per_sec())));
                },
            ),
    );
    bar.set_message(message);
    bar
}

/// A rate as a whole number per second; a rate is never negative nor near `u64::MAX`.
fn rounded(per_sec: f64) -> u64 {
    if per_sec.is_finite() && per_sec > 0.0 {
        // `as` saturates a float to the integer range, which is what a display wants.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let whole = per_sec.round() as u64;
        whole
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::rounded;

    #[test]
    fn a_rate_is_shown_as_a_whole_number() {
        assert_eq!(rounded(11_276.211_9), 11_276);
        assert_eq!(rounded(0.4), 0);
        assert_eq!(rounded(f64::NAN), 0);
    }
}
