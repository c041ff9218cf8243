//! The open loop's clock: a Linux `timerfd` watched by tokio's reactor, so the schedule is
//! kept on the generator's own thread with microsecond resolution.
//!
//! tokio's timer ticks in whole milliseconds, far coarser than the latencies measured. A
//! thread of its own that sleeps until each request is due and hands it to the runtime
//! needs two threads to wake per request, and it waits for a core of its own to do so: its
//! send lag p99 reached 68–149 ms on a busy 2-core machine. With the timer in the
//! reactor, the one thread wakes for whatever is ready: a due request, an answer, or both.

use std::io;
use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::net::unix::pipe;

pub struct Timer {
    /// The timerfd, watched by the reactor. tokio's one safe way to watch an owned,
    /// non-blocking descriptor it did not open is a pipe's read end; a timerfd reads like
    /// one (8 bytes, the count of expirations; `EAGAIN` before the first).
    fd: pipe::Receiver,
}

impl Timer {
    /// A disarmed timer on the monotonic clock (the one `Instant` reads).
    pub fn new() -> io::Result<Timer> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(Timer {
            fd: pipe::Receiver::from_owned_fd_unchecked(fd)?,
        })
    }

    /// Returns once `when` has come; at once, without yielding, if it already has.
    pub async fn until(&self, when: Instant) -> io::Result<()> {
        let now = Instant::now();
        if when <= now {
            return Ok(());
        }
        let wait = timespec(when - now)?;
        let zero = timespec(Duration::ZERO)?;
        timerfd_settime(
            &self.fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: wait,
            },
        )?;
        loop {
            self.fd.readable().await?;
            // Reading the count of expirations consumes the readiness.
            let mut expirations = [0u8; 8];
            match self.fd.try_read(&mut expirations) {
                Ok(_) => return Ok(()),
                // A readiness left from before this wait: wait on.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn timespec(d: Duration) -> io::Result<Timespec> {
    Timespec::try_from(d).map_err(|_| io::Error::other(format!("{d:?} is too long a wait")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn waits_until_the_instant_and_not_for_a_past_one() {
        let timer = Timer::new().unwrap();
        let when = Instant::now() + Duration::from_micros(300);
        timer.until(when).await.unwrap();
        assert!(Instant::now() >= when);
        // Already passed: returns without arming the timer (no wait on a disarmed fd).
        let before = Instant::now();
        timer.until(before).await.unwrap();
        // Reusable: a second wait after the first.
        let when = Instant::now() + Duration::from_micros(200);
        timer.until(when).await.unwrap();
        assert!(Instant::now() >= when);
    }
}
