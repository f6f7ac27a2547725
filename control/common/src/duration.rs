//! Durations as upstream's flags write them.

use std::time::Duration;

/// A duration flag that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration at all.
    #[error("bad duration {text:?}: {reason}")]
    Syntax {
        /// What was given.
        text: String,
        /// Why jiff refused it (jiff's error is not `PartialEq`, so it is
        /// kept as its message).
        reason: String,
    },
    /// A negative duration.
    #[error("bad duration {text:?}: negative")]
    Negative {
        /// What was given.
        text: String,
    },
}

/// Parse a duration as upstream's flags write it (`10s`, `2m`, `1h0m0s`,
/// `1m30s`, `500ms`; jiff's friendly format, which also takes `1h 30m`), or
/// a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let parsed: jiff::SignedDuration =
        text.parse()
            .map_err(|e: jiff::Error| DurationError::Syntax {
                text: text.to_string(),
                reason: e.to_string(),
            })?;
    Duration::try_from(parsed).map_err(|_| DurationError::Negative {
        text: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_flags() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        for bad in ["x", "", "5d", "1h x", "m", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
