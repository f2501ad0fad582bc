//! The minimal fd-passing reference: one master accepts and sends each accepted
//! descriptor with `sendfd` (one per `sendmsg`), round-robin, to N workers that serve
//! it with hyper on a current-thread runtime, the demo worker's answer. No protocol,
//! no supervision: what rr-cluster's dispatch and worker path cost is measured
//! against this.
//!
//! `ref-fdpass --port P --workers N` (SIGTERM stops it and its workers).

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;

use rr_cluster_benches::service::{Identity, arg, serve_http1};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use sendfd::SendWithFd;

fn main() -> std::io::Result<()> {
    if std::env::var_os("RR_CLUSTER_CHANNEL_FD").is_some() {
        return worker();
    }
    let port: u16 = arg("--port", 8080);
    let workers: usize = arg("--workers", 2);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    // The backlog rr-cluster's listener has (std's default may be shorter).
    rustix::net::listen(&listener, 4096)?;
    let mut channels = Vec::new();
    let mut children = Vec::new();
    for slot in 0..workers {
        let (ours, theirs) = StdUnixStream::pair()?;
        // Not close-on-exec in the child: a copy without the flag.
        let inherited = rustix::io::dup(&theirs).map_err(std::io::Error::from)?;
        let raw = inherited.as_raw_fd();
        let child = std::process::Command::new(std::env::current_exe()?)
            .env("RR_CLUSTER_CHANNEL_FD", raw.to_string())
            .env("REF_WORKER_SLOT", slot.to_string())
            .process_group(0)
            .spawn()?;
        drop(theirs);
        drop(inherited);
        channels.push(ours);
        children.push(child);
    }
    // Blocking accept: the master does nothing else.
    let mut next = 0;
    loop {
        let (stream, _) = listener.accept()?;
        let fd: RawFd = stream.as_raw_fd();
        if channels[next].send_with_fd(b"c", &[fd]).is_err() {
            break;
        }
        drop(stream);
        next = (next + 1) % channels.len();
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

fn worker() -> std::io::Result<()> {
    let slot: u32 = std::env::var("REF_WORKER_SLOT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // The library's safe adoption of an inherited descriptor (it checks /proc).
    let channel =
        StdUnixStream::from(rr_cluster::worker::adopt_channel().map_err(std::io::Error::other)?);
    let identity = Identity::new(slot);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        channel.set_nonblocking(true)?;
        let channel = tokio::net::UnixStream::from_std(channel)?;
        let mut buf = [0u8; 64];
        loop {
            channel.readable().await?;
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(64))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let received = channel.try_io(tokio::io::Interest::READABLE, || {
                rustix::net::recvmsg(
                    channel.as_fd(),
                    &mut iov,
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)
            });
            match received {
                Ok(msg) if msg.bytes == 0 => return Ok(()),
                Ok(_) => {
                    for message in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(fds) = message {
                            for fd in fds {
                                let stream = std::net::TcpStream::from(fd);
                                stream.set_nonblocking(true)?;
                                let stream = tokio::net::TcpStream::from_std(stream)?;
                                tokio::spawn(serve_http1(stream, identity.clone()));
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    })
}
