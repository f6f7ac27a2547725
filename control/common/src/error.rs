//! Error helpers every component uses: the cause chain for logs, and the
//! HTTP code of a failed API request.

/// The error and its causes, `outer: cause: root cause`, for logs and
/// messages. Errors of this project never repeat their `#[source]` in
/// their own message, so each cause appears once.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The HTTP code the API server answered a failed request with, if it
/// answered at all.
pub fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether the API server answered with `code` (404, 409…).
pub fn is_status(error: &kube::Error, code: u16) -> bool {
    api_code(error) == Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn the_chain_names_each_cause_once() {
        let error = Outer {
            source: std::io::Error::other("inner"),
        };
        assert_eq!(chain(&error), "outer: inner");
    }
}
