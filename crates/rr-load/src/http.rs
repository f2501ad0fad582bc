//! HTTP/1.1 responses as the load driver reads them: pure functions over byte slices, no I/O.
//!
//! [`parse_head`] reads the status line and headers from the start of a buffer that may
//! hold only part of them (it answers `Ok(None)` until the blank line has arrived). The
//! syntax is checked by [`httparse`], hyper's parser; what the headers mean for this
//! client (framing, keep-alive, the worker's id) is decided here. [`Body`] then consumes
//! the body in whatever pieces the socket delivers, for the three framings a response
//! can have: `Content-Length`, `Transfer-Encoding: chunked`, or "until the server
//! closes". Nothing here allocates, and no input makes it panic: every malformed
//! response is a [`ParseError`].

use std::mem::MaybeUninit;

/// The longest response head (status line and headers) accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;

/// The most header lines accepted in one response head (hyper's default limit too).
pub const MAX_HEADERS: usize = 100;

/// The most bytes of chunk extensions or trailers accepted in one body.
const MAX_CHUNK_META: usize = 16 * 1024;

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (`1xx`, `204`, `304`, or `Content-Length: 0`).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

/// The parsed status line and headers of a response.
///
/// Only what the load driver needs is kept: the status, how the body is framed, whether
/// the connection may be reused, and the demo worker's `x-worker-id`/`x-worker-pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// The minor version: `HTTP/1.0` or `HTTP/1.1`.
    pub minor_version: u8,
    /// The status code, `100..=999`.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    /// The value of `x-worker-id`, trimmed.
    pub worker_id: Option<&'a [u8]>,
    /// The value of `x-worker-pid`, if it is a number.
    pub worker_pid: Option<u32>,
    /// The length of the head in bytes, blank line included: the body starts here.
    pub len: usize,
}

impl Head<'_> {
    /// An interim `1xx` response (other than `101`) that the final response follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Why a response could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The head is longer than the limit.
    #[error("response head longer than {max} bytes")]
    HeadTooLarge {
        /// The limit.
        max: usize,
    },
    /// The status line is not `HTTP/1.x NNN reason`.
    #[error("malformed status line")]
    BadStatusLine,
    /// A header line is not `name: value`.
    #[error("malformed header line")]
    BadHeader,
    /// The head has more header lines than [`MAX_HEADERS`].
    #[error("more than {max} response headers")]
    TooManyHeaders {
        /// The limit.
        max: usize,
    },
    /// `Content-Length` is not a number, or two of them disagree.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// The chunked body is malformed.
    #[error("malformed chunked body")]
    BadChunk,
    /// The server switched protocols though it was not asked to.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
    /// The connection closed before the response was complete.
    #[error("connection closed in the middle of a response")]
    Incomplete,
    /// The server sent bytes after the response, before a new request.
    #[error("unsolicited bytes after the response")]
    TrailingBytes,
}

/// Parses a response head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete (read more and call again with the
/// longer buffer), `Ok(Some(head))` once the blank line is in, and an error as soon as
/// the bytes seen cannot start a valid response or the head exceeds `max` bytes.
pub fn parse_head(buf: &[u8], max: usize) -> Result<Option<Head<'_>>, ParseError> {
    // httparse skips empty lines before the status line (a robustness rule meant for
    // requests); a response must start right away.
    if buf.iter().zip(b"HTTP/1.").any(|(a, b)| a != b) {
        return Err(ParseError::BadStatusLine);
    }
    // Only the first `max` bytes can hold an acceptable head: httparse never sees more.
    let window = &buf[..buf.len().min(max)];
    // Uninitialised slots: nothing to zero on every read; httparse fills what it uses.
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        window,
        &mut headers,
    );
    // httparse takes `000`..`099` too. Its fields fill in as it goes: reject such a code
    // as soon as it is in, like any other bad status line.
    if response.code.is_some_and(|code| code < 100) {
        return Err(ParseError::BadStatusLine);
    }
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max => {
            return Err(ParseError::HeadTooLarge { max });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(syntax_error(e)),
    };
    let (Some(minor_version), Some(status)) = (response.version, response.code) else {
        // A complete parse has both; this only keeps a surprise from becoming a panic.
        return Err(ParseError::BadStatusLine);
    };
    let mut head = Head {
        minor_version,
        status,
        framing: Framing::UntilClose,
        keep_alive: minor_version == 1,
        worker_id: None,
        worker_pid: None,
        len,
    };
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    for header in response.headers.iter() {
        // httparse has dropped the whitespace around the value.
        let (name, value) = (header.name.as_bytes(), header.value);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_decimal(value).ok_or(ParseError::BadContentLength)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(ParseError::BadContentLength);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Only the final coding decides; a later header overrides an earlier one.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim(token);
                if token.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection_keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"x-worker-id") {
            head.worker_id = Some(value);
        } else if name.eq_ignore_ascii_case(b"x-worker-pid") {
            head.worker_pid = parse_decimal(value).and_then(|n| u32::try_from(n).ok());
        }
    }
    if head.status == 101 {
        return Err(ParseError::UnexpectedUpgrade);
    }
    if minor_version == 0 && connection_keep_alive {
        head.keep_alive = true;
    }
    if connection_close {
        head.keep_alive = false;
    }
    head.framing = if head.status < 200 || head.status == 204 || head.status == 304 {
        Framing::Empty
    } else if transfer_encoding {
        // RFC 9112 6.3: with Transfer-Encoding, Content-Length is ignored, and a
        // response whose final coding is not chunked runs until the close.
        if content_length.is_some() {
            head.keep_alive = false;
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if head.framing == Framing::UntilClose {
        head.keep_alive = false;
    }
    Ok(Some(head))
}

/// The kind of an httparse syntax error (a function, not a `From`, so that no httparse
/// type shows in rr-load's public API).
fn syntax_error(e: httparse::Error) -> ParseError {
    match e {
        httparse::Error::Version | httparse::Error::Status | httparse::Error::Token => {
            ParseError::BadStatusLine
        }
        httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine => {
            ParseError::BadHeader
        }
        httparse::Error::TooManyHeaders => ParseError::TooManyHeaders { max: MAX_HEADERS },
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A non-empty run of ASCII digits that fits in a `u64`.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

/// The body of one response being consumed, piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// This many bytes are still to come.
    Length(u64),
    /// A chunked body.
    Chunked(ChunkedDecoder),
    /// Everything until the server closes.
    UntilClose,
    /// The body is complete.
    Done,
}

impl Body {
    /// The body state right after a head with this framing.
    pub fn new(framing: Framing) -> Body {
        match framing {
            Framing::Empty | Framing::Length(0) => Body::Done,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => Body::UntilClose,
        }
    }

    /// The body is complete.
    pub fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }

    /// Consumes body bytes from `data`; returns how many belonged to the body. Once the
    /// body is complete ([`Body::is_done`]), the rest of `data` is not consumed.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, ParseError> {
        match self {
            Body::Done => Ok(0),
            Body::UntilClose => Ok(data.len()),
            Body::Length(remaining) => {
                let take = usize::try_from(*remaining).map_or(data.len(), |r| r.min(data.len()));
                *remaining -= take as u64;
                if *remaining == 0 {
                    *self = Body::Done;
                }
                Ok(take)
            }
            Body::Chunked(decoder) => {
                let used = decoder.feed(data)?;
                if decoder.is_done() {
                    *self = Body::Done;
                }
                Ok(used)
            }
        }
    }

    /// The server closed the connection: fine for a body that runs until the close, an
    /// error for any other that is not complete.
    pub fn finish_at_eof(&mut self) -> Result<(), ParseError> {
        match self {
            Body::Done => Ok(()),
            Body::UntilClose => {
                *self = Body::Done;
                Ok(())
            }
            Body::Length(_) | Body::Chunked(_) => Err(ParseError::Incomplete),
        }
    }
}

/// Where a [`ChunkedDecoder`] is within the chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// Reading the hex size.
    #[default]
    Size,
    /// Whitespace after the size.
    SizeSpace,
    /// A chunk extension, up to the end of the line.
    Extension,
    /// Expecting the `\n` of the size line.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// Expecting the `\r\n` after chunk data.
    DataCr,
    /// Expecting the `\n` after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerStart,
    /// Inside a trailer line.
    TrailerLine,
    /// Expecting the `\n` of the final blank line.
    EndLf,
    /// The body is complete.
    Done,
}

/// An incremental decoder of a `Transfer-Encoding: chunked` body that discards the data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Bytes left in the current chunk, or the size being read.
    remaining: u64,
    /// Hex digits of the size read so far.
    digits: u8,
    /// Bytes of extensions and trailers seen, against [`MAX_CHUNK_META`].
    meta: usize,
}

impl ChunkedDecoder {
    /// The last chunk and the trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes bytes of the body from `data`; returns how many were used (all of them,
    /// unless the body ended inside `data`).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, ParseError> {
        let mut i = 0;
        while i < data.len() {
            if self.state == ChunkState::Done {
                break;
            }
            if self.state == ChunkState::Data {
                let take = usize::try_from(self.remaining)
                    .map_or(data.len() - i, |r| r.min(data.len() - i));
                self.remaining -= take as u64;
                i += take;
                if self.remaining == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            self.step(data[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), ParseError> {
        use ChunkState as S;
        let bad = Err(ParseError::BadChunk);
        self.state = match (self.state, b) {
            (S::Size, b) if b.is_ascii_hexdigit() => {
                if self.digits >= 15 {
                    return bad;
                }
                self.digits += 1;
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => b - b'A' + 10,
                };
                self.remaining = self.remaining * 16 + u64::from(digit);
                S::Size
            }
            (S::Size, _) if self.digits == 0 => return bad,
            (S::Size | S::SizeSpace, b' ' | b'\t') => S::SizeSpace,
            (S::Size | S::SizeSpace, b';') => S::Extension,
            (S::Size | S::SizeSpace | S::Extension, b'\r') => S::SizeLf,
            (S::Size | S::SizeSpace | S::Extension | S::SizeLf, b'\n') => self.end_of_size_line(),
            (S::Extension, _) => {
                self.count_meta()?;
                S::Extension
            }
            (S::DataCr, b'\r') => S::DataLf,
            (S::DataCr | S::DataLf, b'\n') => {
                self.digits = 0;
                self.remaining = 0;
                S::Size
            }
            (S::TrailerStart, b'\r') => S::EndLf,
            (S::TrailerStart | S::EndLf, b'\n') => S::Done,
            (S::TrailerStart | S::TrailerLine, b) => {
                self.count_meta()?;
                if b == b'\n' {
                    S::TrailerStart
                } else {
                    S::TrailerLine
                }
            }
            _ => return bad,
        };
        Ok(())
    }

    fn end_of_size_line(&mut self) -> ChunkState {
        if self.remaining == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        }
    }

    fn count_meta(&mut self) -> Result<(), ParseError> {
        self.meta += 1;
        if self.meta > MAX_CHUNK_META {
            Err(ParseError::BadChunk)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-worker-id: 1\r\n\
        X-Worker-Pid:  4242 \r\nContent-Length: 12\r\n\r\nHello World\n";

    fn head(buf: &[u8]) -> Head<'_> {
        parse_head(buf, MAX_HEAD)
            .expect("valid response")
            .expect("complete head")
    }

    #[test]
    fn parses_a_plain_response() {
        let h = head(OK);
        assert_eq!(h.status, 200);
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.keep_alive);
        assert_eq!(h.worker_id, Some(&b"1"[..]));
        assert_eq!(h.worker_pid, Some(4242));
        assert_eq!(&OK[h.len..], b"Hello World\n");
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error() {
        let end = head(OK).len;
        for cut in 0..end {
            assert_eq!(parse_head(&OK[..cut], MAX_HEAD), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_is_rejected_early() {
        assert_eq!(
            parse_head(b"HELLO", MAX_HEAD),
            Err(ParseError::BadStatusLine)
        );
        assert_eq!(
            parse_head(b"SSH-2.0-OpenSSH\r\n", MAX_HEAD),
            Err(ParseError::BadStatusLine)
        );
        assert_eq!(parse_head(b"HTTP/1.", MAX_HEAD), Ok(None));
    }

    #[test]
    fn bad_status_lines() {
        for line in [
            &b"HTTP/2.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 099\r\n\r\n",
            b"HTTP/1.1  200 OK\r\n\r\n",
            b"HTTP/1.2 200 OK\r\n\r\n",
            b"HTTP/1.1 200 O\x00K\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(line, MAX_HEAD),
                Err(ParseError::BadStatusLine),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        // A missing reason phrase is fine.
        assert_eq!(head(b"HTTP/1.1 204\r\n\r\n").status, 204);
    }

    #[test]
    fn bad_headers() {
        for h in [
            &b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nName : space\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\x01c\r\n\r\n",
        ] {
            assert_eq!(parse_head(h, MAX_HEAD), Err(ParseError::BadHeader));
        }
        for h in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
        ] {
            assert_eq!(parse_head(h, MAX_HEAD), Err(ParseError::BadContentLength));
        }
        let same = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(same.framing, Framing::Length(3));
    }

    #[test]
    fn head_size_is_limited() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..100 {
            big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(
            parse_head(&big, 1024),
            Err(ParseError::HeadTooLarge { max: 1024 })
        );
        // Also without any newline in sight.
        let line = [b'H'; 2000];
        assert!(parse_head(&line, 1024).is_err());
    }

    #[test]
    fn connection_and_version_rules() {
        assert!(
            !head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive
        );
        assert!(
            !head(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n")
                .keep_alive
        );
        assert!(!head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(
            head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
                .keep_alive
        );
        // No length at all: the body runs until the close.
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
    }

    #[test]
    fn framing_rules() {
        assert_eq!(
            head(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            head(b"HTTP/1.1 304 Not Modified\r\n\r\n").framing,
            Framing::Empty
        );
        let h = head(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(h.is_interim());
        assert_eq!(h.framing, Framing::Empty);
        let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
        let h =
            head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive, "TE with CL must not be reused");
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").framing,
            Framing::UntilClose
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", MAX_HEAD),
            Err(ParseError::UnexpectedUpgrade)
        );
    }

    #[test]
    fn bare_newlines_are_accepted() {
        let h = head(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi");
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(h.len, 35);
    }

    #[test]
    fn worker_pid_must_be_numeric() {
        let h = head(b"HTTP/1.1 200 OK\r\nx-worker-pid: abc\r\nx-worker-id:  a b \r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.worker_pid, None);
        assert_eq!(h.worker_id, Some(&b"a b"[..]));
    }

    /// httparse skips empty lines before a status line; a response may not have any.
    #[test]
    fn leading_empty_lines_are_rejected() {
        for buf in [
            &b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
            b"\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"\r\n",
            b"\n",
        ] {
            assert_eq!(parse_head(buf, MAX_HEAD), Err(ParseError::BadStatusLine));
        }
    }

    #[test]
    fn head_of_exactly_max_bytes_is_accepted() {
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        let len = head(buf).len;
        assert_eq!(
            parse_head(buf, len).map(|h| h.map(|h| h.len)),
            Ok(Some(len))
        );
        assert_eq!(
            parse_head(buf, len - 1),
            Err(ParseError::HeadTooLarge { max: len - 1 })
        );
        // Incomplete and already longer than the limit.
        assert_eq!(
            parse_head(&buf[..len - 1], len - 2),
            Err(ParseError::HeadTooLarge { max: len - 2 })
        );
        assert_eq!(parse_head(&buf[..len - 1], len - 1), Ok(None));
    }

    #[test]
    fn header_count_is_limited() {
        let with_headers = |n: usize| {
            let mut buf = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..n {
                buf.extend_from_slice(format!("X-Filler-{i}: a\r\n").as_bytes());
            }
            buf.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            buf
        };
        let ok = with_headers(MAX_HEADERS - 1);
        assert_eq!(head(&ok).framing, Framing::Empty);
        assert_eq!(
            parse_head(&with_headers(MAX_HEADERS), MAX_HEAD),
            Err(ParseError::TooManyHeaders { max: MAX_HEADERS })
        );
    }

    /// A byte that no valid response can have there is an error at once, without
    /// waiting for the end of its line.
    #[test]
    fn bad_bytes_are_rejected_before_the_line_ends() {
        for (buf, err) in [
            (&b"HTTP/1.1 2x"[..], ParseError::BadStatusLine),
            (b"HTTP/1.1 099", ParseError::BadStatusLine),
            (b"HTTP/1.1 200 O\x00", ParseError::BadStatusLine),
            (b"HTTP/1.1 200 OK\r\nNa me", ParseError::BadHeader),
            (b"HTTP/1.1 200 OK\r\nA: b\x7f", ParseError::BadHeader),
            (b"HTTP/1.1 200 OK\r\n\rX", ParseError::BadHeader),
        ] {
            assert_eq!(
                parse_head(buf, MAX_HEAD),
                Err(err),
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn obs_text_is_accepted_in_reason_and_values() {
        let h =
            head(b"HTTP/1.1 200 \xe9t\xe9\r\nx-worker-id: caf\xe9\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.status, 200);
        assert_eq!(h.worker_id, Some(&b"caf\xe9"[..]));
        // An empty value and a tab before the value are fine too.
        let h =
            head(b"HTTP/1.1 200 OK\r\nX-Empty:\r\nConnection:\tclose\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive);
    }

    #[test]
    fn length_body_in_pieces() {
        let mut body = Body::new(Framing::Length(5));
        assert_eq!(body.feed(b"ab"), Ok(2));
        assert!(!body.is_done());
        assert_eq!(body.feed(b"cdeXYZ"), Ok(3));
        assert!(body.is_done());
        assert_eq!(body.feed(b"more"), Ok(0));
        let mut body = Body::new(Framing::Length(5));
        body.feed(b"ab").expect("feed");
        assert_eq!(body.finish_at_eof(), Err(ParseError::Incomplete));
        let mut body = Body::new(Framing::UntilClose);
        assert_eq!(body.feed(b"anything"), Ok(8));
        assert_eq!(body.finish_at_eof(), Ok(()));
        assert!(body.is_done());
    }

    const CHUNKED: &[u8] =
        b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\n";

    #[test]
    fn chunked_body_whole_and_byte_by_byte() {
        let mut d = ChunkedDecoder::default();
        let mut data = CHUNKED.to_vec();
        data.extend_from_slice(b"NEXT");
        assert_eq!(d.feed(&data), Ok(CHUNKED.len()));
        assert!(d.is_done());

        let mut d = ChunkedDecoder::default();
        for (i, b) in CHUNKED.iter().enumerate() {
            assert!(!d.is_done(), "done early at {i}");
            assert_eq!(d.feed(std::slice::from_ref(b)), Ok(1));
        }
        assert!(d.is_done());
    }

    #[test]
    fn chunked_body_every_split() {
        for cut in 0..=CHUNKED.len() {
            let mut body = Body::new(Framing::Chunked);
            let a = body.feed(&CHUNKED[..cut]).expect("first half");
            assert_eq!(a, cut);
            let b = body.feed(&CHUNKED[cut..]).expect("second half");
            assert_eq!(a + b, CHUNKED.len());
            assert!(body.is_done());
        }
    }

    #[test]
    fn chunked_garbage() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX",
            b"5\r\nhello\rX",
            b"10000000000000000\r\n",
            b"5 x\r\n",
            b"0\r\n\rX",
        ] {
            let mut d = ChunkedDecoder::default();
            assert_eq!(d.feed(bad), Err(ParseError::BadChunk), "{bad:?}");
        }
        let mut d = ChunkedDecoder::default();
        let mut long_ext = b"1;".to_vec();
        long_ext.extend(std::iter::repeat_n(b'a', MAX_CHUNK_META + 1));
        assert_eq!(d.feed(&long_ext), Err(ParseError::BadChunk));
        let mut body = Body::new(Framing::Chunked);
        body.feed(b"5\r\nhel").expect("partial");
        assert_eq!(body.finish_at_eof(), Err(ParseError::Incomplete));
    }

    /// A cheap deterministic fuzz: random and mutated inputs never panic.
    #[test]
    fn never_panics_on_noise() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"HTTP/1.0 2\r\n:;chunkedContent-Length0123456789abcdefxX \t\x00\xff";
        for _ in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut buf: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            if next() % 2 == 0 {
                let mut v = OK.to_vec();
                let at = (next() % v.len() as u64) as usize;
                v[at] = (next() & 0xff) as u8;
                buf = v;
            }
            if let Ok(Some(h)) = parse_head(&buf, 256) {
                assert!(h.len <= buf.len());
                let mut body = Body::new(h.framing);
                let _ = body.feed(&buf[h.len..]);
            }
            let _ = ChunkedDecoder::default().feed(&buf);
        }
    }
}
