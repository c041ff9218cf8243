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
    /// A timer on the monotonic clock (the one `Instant` reads) that expires at `first`
    /// and then every `period`, re-armed by the kernel: the schedule costs no system call
    /// per request. Arming it for each request instead (`timerfd_settime`) took an eighth
    /// of the generator's CPU at 37,000 requests a second (BENCHMARKS.md, section 13).
    pub fn periodic(first: Instant, period: Duration) -> io::Result<Timer> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // A zero value would disarm it; the kernel's clock has moved on since `now`, so
        // no expiry comes before the `Instant` it stands for.
        let wait = first
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: timespec(period.max(Duration::from_nanos(1)))?,
                it_value: timespec(wait)?,
            },
        )?;
        Ok(Timer {
            fd: pipe::Receiver::from_owned_fd_unchecked(fd)?,
        })
    }

    /// Returns once the timer has expired since the last call (at once if it has).
    pub async fn tick(&self) -> io::Result<()> {
        loop {
            self.fd.readable().await?;
            // Reading the count of expirations consumes the readiness.
            let mut expirations = [0u8; 8];
            match self.fd.try_read(&mut expirations) {
                Ok(_) => return Ok(()),
                // A readiness already consumed: wait on.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Returns once `when` has come, if it is one of the timer's expiries or after one.
    pub async fn until(&self, when: Instant) -> io::Result<()> {
        while Instant::now() < when {
            self.tick().await?;
        }
        Ok(())
    }
}

fn timespec(d: Duration) -> io::Result<Timespec> {
    Timespec::try_from(d).map_err(|_| io::Error::other(format!("{d:?} is too long a wait")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn expires_at_each_period_and_never_before() {
        let period = Duration::from_micros(300);
        let first = Instant::now() + Duration::from_micros(500);
        let timer = Timer::periodic(first, period).unwrap();
        for k in 0..5u32 {
            let due = first + period * k;
            timer.until(due).await.unwrap();
            assert!(Instant::now() >= due, "expiry {k} came early");
        }
        // Expiries missed while the thread was busy leave the timer readable: that must
        // not end a later wait early.
        std::thread::sleep(Duration::from_millis(3));
        let later = Instant::now() + period * 2;
        timer.until(later).await.unwrap();
        assert!(
            Instant::now() >= later,
            "a missed expiry ended the wait early"
        );
        // An instant already past returns without waiting for an expiry.
        timer.until(Instant::now() - period).await.unwrap();
    }
}
