//! [`LogBudget`]: a few log lines per second about bad input, so a flood of garbage
//! packets never floods the log.

use std::time::{Duration, Instant};

/// Allows `per_second` lines each second; counts the rest and says how many once the next
/// second starts.
#[derive(Debug)]
pub struct LogBudget {
    what: &'static str,
    per_second: u32,
    second: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogBudget {
    /// A budget for lines about `what` ("malformed DHCP packets").
    pub fn new(what: &'static str, per_second: u32) -> Self {
        LogBudget {
            what,
            per_second,
            second: None,
            lines: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged now.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self
            .second
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            if self.suppressed > 0 {
                tracing::info!(
                    suppressed = self.suppressed,
                    "more {} were dropped without a line each",
                    self.what
                );
            }
            self.second = Some(now);
            self.lines = 0;
            self.suppressed = 0;
        }
        self.lines += 1;
        if self.lines > self.per_second {
            self.suppressed += 1;
            false
        } else {
            true
        }
    }
}

/// `text` cut to `most` characters (with `...` when cut), for a log line about input
/// from the network: a 60,000-byte file name must not make a 60,000-byte line.
pub fn shorten(text: &str, most: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(most) {
        None => std::borrow::Cow::Borrowed(text),
        Some((cut, _)) => std::borrow::Cow::Owned(format!("{}...", &text[..cut])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_shortened_for_logs() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abcdef", 3), "abc...");
        assert_eq!(shorten("ééé", 2), "éé...");
    }

    #[test]
    fn a_burst_gets_its_budget_and_no_more() {
        let mut budget = LogBudget::new("test lines", 3);
        let allowed = (0..100).filter(|_| budget.allow()).count();
        assert_eq!(allowed, 3);
    }
}
