//! A flag raised with a wake-up: how a task that waits on a socket also hears of a
//! stop, without polling a cancellation token's or a watch's future (a lock each) on
//! every wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Raised by one side, polled by one task.
#[derive(Debug, Default)]
pub(crate) struct WakeFlag {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl WakeFlag {
    /// Raises the flag and wakes the task that polls it.
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether raised and not yet taken by [`WakeFlag::poll_raised`].
    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// `Ready` once raised since the last `Ready` (and lowers it).
    pub(crate) fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered first, then looked at: a raise in between is not missed.
        self.waker.register(cx.waker());
        if self.raised.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
