//! How a request can fail: [`ErrorKind`], and the mapping from I/O errors to it.

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection was refused (`ECONNREFUSED`): nothing listens.
    Refused,
    /// The connection was reset or broken (`ECONNRESET`, `EPIPE`, `ECONNABORTED`).
    Reset,
    /// The server closed the connection cleanly before sending any byte of a response.
    Closed,
    /// No complete response within the timeout (connect included).
    Timeout,
    /// A complete response whose status is not 2xx or 3xx.
    BadStatus,
    /// Bytes that are not a valid HTTP/1.x response, or a response cut short; in
    /// keep-alive mode also bytes beyond the end of a response that kept the connection
    /// open, or sent on an idle connection (charged to the next request, which a client
    /// would have read them as).
    BadResponse,
    /// Anything else (e.g. out of local ports or file descriptors).
    Other,
    /// Open loop only: a send due within the measured run that never left, because its
    /// connection was still busy with an earlier request when the run ended.
    Missed,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::Closed,
        ErrorKind::Timeout,
        ErrorKind::BadStatus,
        ErrorKind::BadResponse,
        ErrorKind::Other,
        ErrorKind::Missed,
    ];

    /// The number of kinds.
    pub const COUNT: usize = Self::ALL.len();

    /// The position in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            ErrorKind::Refused => 0,
            ErrorKind::Reset => 1,
            ErrorKind::Closed => 2,
            ErrorKind::Timeout => 3,
            ErrorKind::BadStatus => 4,
            ErrorKind::BadResponse => 5,
            ErrorKind::Other => 6,
            ErrorKind::Missed => 7,
        }
    }

    /// The `snake_case` name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Closed => "closed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BadStatus => "bad_status",
            ErrorKind::BadResponse => "bad_response",
            ErrorKind::Other => "other",
            ErrorKind::Missed => "missed",
        }
    }

    /// Classifies an I/O error of a connect, write or read.
    pub fn from_io(err: &io::Error) -> ErrorKind {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            io::ErrorKind::UnexpectedEof => ErrorKind::Closed,
            io::ErrorKind::InvalidData => ErrorKind::BadResponse,
            _ => ErrorKind::Other,
        }
    }

    /// Whether a response with this status is a success (2xx or 3xx).
    pub fn status_is_success(status: u16) -> bool {
        (200..400).contains(&status)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified() {
        let k = |kind| ErrorKind::from_io(&io::Error::from(kind));
        assert_eq!(k(io::ErrorKind::ConnectionRefused), ErrorKind::Refused);
        assert_eq!(k(io::ErrorKind::ConnectionReset), ErrorKind::Reset);
        assert_eq!(k(io::ErrorKind::BrokenPipe), ErrorKind::Reset);
        assert_eq!(k(io::ErrorKind::ConnectionAborted), ErrorKind::Reset);
        assert_eq!(k(io::ErrorKind::TimedOut), ErrorKind::Timeout);
        assert_eq!(k(io::ErrorKind::AddrNotAvailable), ErrorKind::Other);
        // Raw errno values map the same way.
        let refused = io::Error::from_raw_os_error(rustix::io::Errno::CONNREFUSED.raw_os_error());
        assert_eq!(ErrorKind::from_io(&refused), ErrorKind::Refused);
        let reset = io::Error::from_raw_os_error(rustix::io::Errno::CONNRESET.raw_os_error());
        assert_eq!(ErrorKind::from_io(&reset), ErrorKind::Reset);
    }

    #[test]
    fn index_matches_all() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        assert!(ErrorKind::status_is_success(200));
        assert!(ErrorKind::status_is_success(302));
        assert!(!ErrorKind::status_is_success(404));
        assert!(!ErrorKind::status_is_success(503));
    }
}
