//! One load connection: connect, send the request, read one response, classify errors.
//!
//! The request bytes are built once; the read buffer is allocated once per connection
//! and reused, so a keep-alive request costs one `write` and (usually) one `read` and
//! no allocation. Timeouts are the caller's business: dropping the future of
//! [`Conn::request`] drops the socket it was using.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{Body, MAX_HEAD, parse_head};
use crate::outcome::ErrorKind;
use crate::recorder::WorkerTag;

/// The read buffer's starting size; it grows (up to a head of [`MAX_HEAD`]) only for
/// responses whose head does not fit.
const INITIAL_BUF: usize = 16 * 1024;

/// What an idle keep-alive connection turned out to be when a request was to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Nothing happened on it: it can carry the request.
    Open,
    /// The server closed it (or reset it).
    Closed,
    /// The server sent bytes that no request asked for.
    Unsolicited,
}

/// A complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) worker: Option<WorkerTag>,
}

/// What a load connection does: one request at a time. [`Conn`] is the real one; the
/// run loop's tests drive it with a scripted fake in virtual time.
pub(crate) trait Exchange {
    /// Sends one request and reads its response (connecting first if needed).
    fn request(&mut self) -> impl Future<Output = Result<Reply, ErrorKind>> + Send;
    /// Keep-alive connections reopened so far after the server closed them properly.
    fn reconnects(&self) -> u64;
}

impl Exchange for Conn {
    fn request(&mut self) -> impl Future<Output = Result<Reply, ErrorKind>> + Send {
        Conn::request(self)
    }

    fn reconnects(&self) -> u64 {
        self.reconnects
    }
}

/// A client connection that sends the same request again and again.
#[derive(Debug)]
pub(crate) struct Conn {
    addr: SocketAddr,
    keep_alive: bool,
    request: Arc<[u8]>,
    buf: Vec<u8>,
    /// The open keep-alive connection, between requests.
    stream: Option<TcpStream>,
    /// The last response closed a keep-alive connection properly: the next connect is
    /// a reconnect, not a first connect.
    closed_by_server: bool,
    /// Keep-alive connections reopened after the server closed them properly.
    pub(crate) reconnects: u64,
}

impl Conn {
    pub(crate) fn new(addr: SocketAddr, keep_alive: bool, request: Arc<[u8]>) -> Conn {
        Conn {
            addr,
            keep_alive,
            request,
            buf: vec![0; INITIAL_BUF],
            stream: None,
            closed_by_server: false,
            reconnects: 0,
        }
    }

    /// Sends one request and reads its response, connecting first if needed.
    ///
    /// Bytes the server sent on a keep-alive connection beyond a response, or while the
    /// connection was idle, are a [`ErrorKind::BadResponse`] (of the request whose
    /// response they came with, or of the next one, which a client would have read them
    /// as): the connection is dropped, and the next request opens a new one, which is
    /// not counted as a reconnect.
    pub(crate) async fn request(&mut self) -> Result<Reply, ErrorKind> {
        let mut stream = match self.stream.take() {
            Some(stream) => match self.idle_state(&stream) {
                Idle::Open => stream,
                Idle::Closed => {
                    self.reconnects += 1;
                    self.connect().await?
                }
                Idle::Unsolicited => return Err(ErrorKind::BadResponse),
            },
            None => {
                if std::mem::take(&mut self.closed_by_server) {
                    self.reconnects += 1;
                }
                self.connect().await?
            }
        };
        let (reply, reusable) = self.exchange(&mut stream).await?;
        if self.keep_alive {
            if reusable {
                self.stream = Some(stream);
            } else {
                self.closed_by_server = true;
            }
        }
        Ok(reply)
    }

    async fn connect(&mut self) -> Result<TcpStream, ErrorKind> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| ErrorKind::from_io(&e))?;
        // Requests are single small writes; still, never let Nagle hold one back.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Whether the server closed (or wrote to) an idle keep-alive connection. This
    /// costs no system call unless the reactor has seen the socket become readable.
    fn idle_state(&mut self, stream: &TcpStream) -> Idle {
        match stream.try_read(&mut self.buf[..1]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Idle::Open,
            Ok(n) if n > 0 => Idle::Unsolicited,
            // EOF, or an error (a reset): closed.
            _ => Idle::Closed,
        }
    }

    /// Writes the request and reads one response; returns it and whether the connection
    /// can carry another request.
    async fn exchange(&mut self, stream: &mut TcpStream) -> Result<(Reply, bool), ErrorKind> {
        let io = |e: std::io::Error| ErrorKind::from_io(&e);
        stream.write_all(&self.request).await.map_err(io)?;

        let mut filled = 0;
        let (reply, keep_alive, framing, head_len) = loop {
            if filled > 0 {
                match parse_head(&self.buf[..filled], MAX_HEAD) {
                    Err(_) => return Err(ErrorKind::BadResponse),
                    Ok(Some(head)) if head.is_interim() => {
                        // 100 Continue and friends: the final response follows.
                        let len = head.len;
                        self.buf.copy_within(len..filled, 0);
                        filled -= len;
                        continue;
                    }
                    Ok(Some(head)) => {
                        let reply = Reply {
                            status: head.status,
                            worker: head.worker_id.map(|id| WorkerTag::new(id, head.worker_pid)),
                        };
                        break (reply, head.keep_alive, head.framing, head.len);
                    }
                    Ok(None) => {}
                }
            }
            if filled == self.buf.len() {
                // parse_head rejects heads over MAX_HEAD, so this stays bounded.
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = stream.read(&mut self.buf[filled..]).await.map_err(io)?;
            if n == 0 {
                return Err(if filled == 0 {
                    ErrorKind::Closed
                } else {
                    ErrorKind::BadResponse
                });
            }
            filled += n;
        };

        let mut body = Body::new(framing);
        let mut pos = head_len;
        let mut eof = false;
        loop {
            pos += body
                .feed(&self.buf[pos..filled])
                .map_err(|_| ErrorKind::BadResponse)?;
            if body.is_done() {
                break;
            }
            let n = stream.read(&mut self.buf[..]).await.map_err(io)?;
            if n == 0 {
                body.finish_at_eof().map_err(|_| ErrorKind::BadResponse)?;
                eof = true;
                break;
            }
            pos = 0;
            filled = n;
        }
        let reusable = keep_alive && !eof;
        if self.keep_alive && reusable && pos < filled {
            // Bytes after the response, on a connection that was to carry the next
            // request: the server's framing is wrong, and a client would read them as
            // the next response.
            return Err(ErrorKind::BadResponse);
        }
        Ok((reply, reusable))
    }
}

/// A [`Conn`] against a scripted server on 127.0.0.1:0.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    /// Every wait of these tests gives up after this long.
    const LIMIT: Duration = Duration::from_secs(10);

    /// What the server does on one connection: for each request read, write these
    /// bytes; after the last, close (`true`) or keep the connection open.
    type Script = (&'static [&'static [u8]], bool);

    /// Serves `scripts`, one connection each, in order.
    async fn server(scripts: Vec<Script>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut open = Vec::new();
            for (answers, close) in scripts {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                for answer in answers {
                    // One request head (small: one read).
                    let mut filled = 0;
                    while !buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf[filled..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => filled += n,
                        }
                    }
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
                if !close {
                    open.push(stream);
                }
            }
            // Hold the open connections (in `open`) until the test's runtime drops this
            // task.
            std::future::pending::<()>().await;
        });
        addr
    }

    fn conn(addr: SocketAddr) -> Conn {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        Conn::new(addr, true, request.into())
    }

    async fn request(conn: &mut Conn) -> Result<u16, ErrorKind> {
        tokio::time::timeout(LIMIT, conn.request())
            .await
            .expect("answered in time")
            .map(|reply| reply.status)
    }

    /// Waits until the idle connection has something to read (bytes or the close).
    async fn until_readable(conn: &Conn) {
        let stream = conn.stream.as_ref().expect("an open connection");
        tokio::time::timeout(LIMIT, stream.readable())
            .await
            .expect("readable in time")
            .expect("readable");
    }

    /// Regression: a keep-alive response with more bytes than its Content-Length said
    /// was a success plus a "reconnect" (as if the server had closed properly).
    #[tokio::test]
    async fn bytes_beyond_a_keep_alive_response_are_a_bad_response() {
        const LONG: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHello World\n";
        let addr = server(vec![(&[LONG], false), (&[OK], false)]).await;
        let mut conn = conn(addr);
        assert_eq!(request(&mut conn).await, Err(ErrorKind::BadResponse));
        // The next request opens a new connection: not a reconnect.
        assert_eq!(request(&mut conn).await, Ok(200));
        assert_eq!(conn.reconnects, 0);
    }

    /// Regression: bytes the server sent on an idle keep-alive connection were taken for
    /// a proper close. The next request, which a client would have read them as its
    /// response, fails.
    #[tokio::test]
    async fn bytes_on_an_idle_connection_fail_the_next_request() {
        let addr = server(vec![
            (&[OK, b"HTTP/1.1 408 Late\r\n\r\n"], false),
            (&[OK], false),
        ])
        .await;
        let mut conn = conn(addr);
        assert_eq!(request(&mut conn).await, Ok(200));
        // The server writes its unsolicited bytes only after reading a second request:
        // send it by hand so that they arrive while the connection is idle.
        let stream = conn.stream.as_mut().expect("kept open");
        stream.write_all(&conn.request).await.expect("write");
        until_readable(&conn).await;
        assert_eq!(request(&mut conn).await, Err(ErrorKind::BadResponse));
        assert_eq!(request(&mut conn).await, Ok(200));
        assert_eq!(conn.reconnects, 0);
    }

    /// A server that closes an idle keep-alive connection: the next request reconnects,
    /// and that is not an error.
    #[tokio::test]
    async fn an_idle_close_is_a_reconnect() {
        let addr = server(vec![(&[OK], true), (&[OK], false)]).await;
        let mut conn = conn(addr);
        assert_eq!(request(&mut conn).await, Ok(200));
        until_readable(&conn).await;
        assert_eq!(request(&mut conn).await, Ok(200));
        assert_eq!(conn.reconnects, 1);
    }
}
