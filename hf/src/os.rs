//! How an error reaches the user: its chain of causes said once each (a cause whose text the
//! message already holds is not repeated), and for an OS error, what to do about it.

use std::error::Error;
use std::io::ErrorKind;

/// `err` and its causes joined by ": ", each text once, then advice for an OS error in the chain.
pub fn error_report(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut io_kind = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
    let mut cause = err.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        io_kind = io_kind.or_else(|| c.downcast_ref::<std::io::Error>().map(|e| e.kind()));
        cause = c.source();
    }
    match io_kind.and_then(advice) {
        Some(advice) => format!("{text} ({advice})"),
        None => text,
    }
}

/// What to do about an OS error of this kind, where there is something to say.
pub fn advice(kind: ErrorKind) -> Option<&'static str> {
    Some(match kind {
        ErrorKind::NotFound => "check that the path exists",
        ErrorKind::PermissionDenied => "check the permissions of the path, or choose another",
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => "free disk space or write elsewhere, then run again",
        ErrorKind::FileTooLarge => "a file-size limit (ulimit -f, or the filesystem's) stopped the write: write elsewhere or raise it",
        ErrorKind::ReadOnlyFilesystem => "the filesystem is read-only: write elsewhere",
        ErrorKind::IsADirectory => "a file was expected here, not a directory",
        ErrorKind::NotADirectory => "a directory was expected here, not a file",
        ErrorKind::AlreadyExists => "remove it or choose another path",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct WithPath {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the config")]
    struct Outer(#[source] WithPath);

    #[test]
    fn an_os_error_is_said_once_with_advice() {
        let err = WithPath { path: "/no/such".into(), source: std::io::Error::from(ErrorKind::NotFound) };
        let os = std::io::Error::from(ErrorKind::NotFound).to_string();
        let text = error_report(&err);
        assert_eq!(text.matches(&os).count(), 1, "{text}");
        assert_eq!(text, format!("/no/such: {os} (check that the path exists)"));
        // A cause the message does not hold is added.
        let text = error_report(&Outer(err));
        assert_eq!(text, format!("cannot read the config: /no/such: {os} (check that the path exists)"));
    }

    #[test]
    fn kinds_without_advice_add_nothing() {
        let err = std::io::Error::other("boom");
        assert_eq!(error_report(&err), "boom");
        assert_eq!(advice(ErrorKind::StorageFull), Some("free disk space or write elsewhere, then run again"));
    }
}
