//! What a kubelet API request's query can get wrong (logs, exec,
//! port-forward): answered with 400 and upstream's message.

/// A query parameter that does not parse, or a required one missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not one of Go's `strconv.ParseBool` spellings.
    #[error("invalid value {value:?} for {key}: not a boolean")]
    NotBoolean {
        /// The parameter.
        key: String,
        /// Its value.
        value: String,
    },
    /// Not an integer.
    #[error("invalid value {value:?} for {key}: not an integer")]
    NotInteger {
        /// The parameter.
        key: String,
        /// Its value.
        value: String,
    },
    /// A count below zero.
    #[error("{key} must be greater than or equal to 0")]
    Negative {
        /// The parameter.
        key: &'static str,
    },
    /// A size or duration below one.
    #[error("{key} must be greater than 0")]
    NotPositive {
        /// The parameter.
        key: &'static str,
    },
    /// `sinceTime` that is not an RFC 3339 time.
    #[error("invalid value {value:?} for sinceTime: {reason}")]
    SinceTime {
        /// Its value.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// An exec without `command`.
    #[error("you must specify at least one command for the container")]
    NoCommand,
    /// An exec with none of stdin, stdout and stderr.
    #[error("you must specify at least 1 of stdin, stdout, stderr")]
    NoStream,
    /// A port-forward `port` that is not a port number.
    #[error("unable to parse {port:?} as a port")]
    Port {
        /// The value.
        port: String,
    },
    /// A port-forward without `port`.
    #[error("query parameter \"port\" is required")]
    NoPort,
}
