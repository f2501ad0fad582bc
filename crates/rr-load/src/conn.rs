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
    pub(crate) async fn request(&mut self) -> Result<Reply, ErrorKind> {
        let mut stream = match self.stream.take() {
            Some(stream) if !self.closed_while_idle(&stream) => stream,
            Some(_) => {
                self.reconnects += 1;
                self.connect().await?
            }
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

    /// The server closed (or wrote to) an idle keep-alive connection. This costs no
    /// system call unless the reactor has seen the socket become readable.
    fn closed_while_idle(&mut self, stream: &TcpStream) -> bool {
        match stream.try_read(&mut self.buf[..1]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            // EOF, unsolicited bytes or an error: in every case not reusable.
            _ => true,
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
        // Bytes after the response were not asked for: do not reuse such a connection.
        let reusable = keep_alive && !eof && pos == filled;
        Ok((reply, reusable))
    }
}
