//! The next segment's file, reserved off the append path.
//!
//! A roll used to create the new segment's file empty, and its appends
//! then reserved disk blocks ahead of themselves (`fallocate`) a few MiB at
//! a time. Those calls run on the writer, under the file's inode lock that
//! every buffered write takes too, and they block for 5 – 17 ms whenever
//! ext4 has to read a block group's bitmap or free an extent-tree block
//! (`benches/busy.sh`, RESULTS session 11): every append queued behind
//! one waited with it.
//!
//! So once the active segment is half full, a background thread creates
//! the next segment's file under a neutral name (`next-segment.spare`)
//! and reserves the whole segment for it; the roll renames it into place.
//! The reservation is a different inode from the one being appended to,
//! and a segment born from a spare never reserves anything itself. A hot
//! partition asks at once, and its segment that reserves for itself rolls
//! as soon as the spare is ready (`Log::wants_spare`).
//!
//! Disk cost: at most one reserved segment per partition that is hot or
//! whose active segment is over half full, released when the log closes,
//! and never taken from the last twentieth of the file system. A spare is
//! never data: its length stays 0, a crash leaves at most an empty file,
//! and opening a log deletes it. When the spare is not ready in time (a
//! roll by age, a segment that filled faster than its spare could be
//! reserved, a file system that cannot reserve or is nearly full), the
//! roll creates the file as before.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crate::index_file::io_err;
use crate::segment;
use crate::Result;

/// The spare's name inside a partition directory.
pub(crate) const SPARE_NAME: &str = "next-segment.spare";

#[derive(Debug)]
enum State {
    /// None held, none asked for.
    Idle,
    /// Asked for; the reserver has not started it.
    Queued,
    /// The reserver is creating and reserving it.
    Running,
    /// Created with `reserved` bytes reserved, under `SPARE_NAME`.
    Ready { file: File, reserved: u64 },
    /// The last attempt failed; not retried until the next roll.
    Failed,
    /// The log closed: nothing is prepared any more.
    Closed,
}

/// One log's spare.
#[derive(Debug)]
pub(crate) struct Spare {
    path: PathBuf,
    state: Mutex<State>,
    /// `state` is `Ready`, readable without the lock on every append.
    ready: AtomicBool,
    /// Signalled when a reservation leaves `Queued`/`Running`.
    settled: Condvar,
}

type Job = Box<dyn FnOnce() + Send>;

/// The one background thread that reserves spares for every log of the
/// process, one at a time, so a thousand partitions rolling together do
/// not start a thousand threads. `None` if it could not be started.
fn reserver() -> Option<&'static Mutex<Sender<Job>>> {
    static RESERVER: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    RESERVER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("runnel-reserve".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .map_err(|error| tracing::warn!(%error, "no thread to reserve spare segments"))
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
}

/// Whether reserving `bytes` on a file system with `free` of `total`
/// bytes available leaves room: a spare is an optimisation, and must not
/// be what fills a disk that appends to other partitions need. After it
/// at least as much again, and at least a twentieth of the file system,
/// must stay free.
fn leaves_room(free: u64, total: u64, bytes: u64) -> bool {
    free.saturating_sub(bytes) >= bytes.max(total / 20)
}

/// (bytes available to this process, total bytes) of the file system
/// holding `dir`.
#[allow(unsafe_code)]
fn space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` points to
    // writable memory of the struct's size; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    // The types are u64 on 64-bit Linux, narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    let unit = u64::from(stat.f_frsize).max(1);
    #[allow(clippy::useless_conversion)]
    Ok((
        u64::from(stat.f_bavail).saturating_mul(unit),
        u64::from(stat.f_blocks).saturating_mul(unit),
    ))
}

impl Spare {
    pub(crate) fn new(dir: &Path) -> Arc<Spare> {
        Arc::new(Spare {
            path: dir.join(SPARE_NAME),
            state: Mutex::new(State::Idle),
            ready: AtomicBool::new(false),
            settled: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the background thread for a spare of `bytes` unless one is
    /// held or on its way (or the last attempt failed since the last roll).
    pub(crate) fn prepare(self: &Arc<Self>, bytes: u64) {
        let mut state = self.lock();
        if !matches!(*state, State::Idle) {
            return;
        }
        let Some(reserver) = reserver() else {
            *state = State::Failed;
            return;
        };
        *state = State::Queued;
        drop(state);
        let spare = Arc::clone(self);
        let sent = reserver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Box::new(move || spare.reserve(bytes)));
        if sent.is_err() {
            self.settle(State::Failed);
        }
    }

    /// On the reserver: creates the spare and reserves `bytes` for it.
    fn reserve(&self, bytes: u64) {
        {
            let mut state = self.lock();
            if !matches!(*state, State::Queued) {
                return;
            }
            *state = State::Running;
        }
        match space(self.path.parent().unwrap_or(Path::new("."))) {
            Ok((free, total)) if leaves_room(free, total, bytes) => {}
            Ok((free, total)) => {
                tracing::debug!(path = %self.path.display(), bytes, free, total, "no spare segment: too little free space");
                self.settle(State::Failed);
                return;
            }
            Err(error) => {
                tracing::debug!(path = %self.path.display(), %error, "no spare segment");
                self.settle(State::Failed);
                return;
            }
        }
        let made = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .and_then(|file| segment::reserve_blocks(&file, 0, bytes).map(|()| file));
        match made {
            Ok(file) => {
                tracing::debug!(path = %self.path.display(), bytes, "reserved a spare segment");
                self.settle(State::Ready {
                    file,
                    reserved: bytes,
                });
            }
            Err(error) => {
                tracing::debug!(path = %self.path.display(), %error, "no spare segment");
                let _ = std::fs::remove_file(&self.path);
                self.settle(State::Failed);
            }
        }
    }

    /// Ends a queued or running reservation in `next` and wakes whoever
    /// waits for that.
    fn settle(&self, next: State) {
        let mut state = self.lock();
        if matches!(*state, State::Queued | State::Running) {
            self.ready
                .store(matches!(next, State::Ready { .. }), Ordering::Release);
            *state = next;
        }
        self.settled.notify_all();
    }

    /// Waits while a reservation is running; returns the lock.
    fn not_running(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        while matches!(*state, State::Running) {
            state = self.settled.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state
    }

    /// A spare is ready to be taken.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// For a roll: the spare, renamed to `log_path`, and how many bytes
    /// are reserved in it; `None` if none is ready (the roll then creates
    /// the file itself). Does not wait for one on its way. After a roll
    /// the next half-full segment may ask again.
    pub(crate) fn take(&self, log_path: &Path) -> Option<(File, u64)> {
        let mut state = self.lock();
        self.ready.store(false, Ordering::Release);
        match std::mem::replace(&mut *state, State::Idle) {
            State::Ready { file, reserved } => {
                drop(state);
                match std::fs::rename(&self.path, log_path) {
                    Ok(()) => Some((file, reserved)),
                    Err(error) => {
                        tracing::warn!(path = %self.path.display(), %error, "could not use the spare segment");
                        let _ = std::fs::remove_file(&self.path);
                        None
                    }
                }
            }
            State::Failed | State::Idle => None,
            other => {
                // Queued, Running or Closed: leave it.
                *state = other;
                None
            }
        }
    }

    /// Drops a ready spare (when reservations were turned off).
    pub(crate) fn discard(&self) -> Result<()> {
        let mut state = self.lock();
        if matches!(*state, State::Ready { .. }) {
            *state = State::Idle;
            self.ready.store(false, Ordering::Release);
            drop(state);
            std::fs::remove_file(&self.path).map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// For `Log::close`: waits out a reservation under way, then stops
    /// any more. With `remove`, deletes the spare file; a crash (or a
    /// test of one) leaves it for the next open to delete.
    pub(crate) fn close(&self, remove: bool) -> Result<()> {
        // A queued reservation finds the state changed and does nothing.
        let mut state = self.not_running();
        let held = matches!(*state, State::Ready { .. });
        *state = State::Closed;
        self.ready.store(false, Ordering::Release);
        drop(state);
        if held && remove {
            std::fs::remove_file(&self.path).map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Stops reservations without waiting: a queued one will find the
    /// state changed and do nothing, a ready spare is dropped (its file
    /// goes with the directory), one under way is left running for
    /// [`Spare::close`] to wait out.
    pub(crate) fn stop(&self) {
        let mut state = self.lock();
        if !matches!(*state, State::Running) {
            *state = State::Closed;
            self.ready.store(false, Ordering::Release);
        }
    }

    /// Tests: waits until no reservation is queued or running and says
    /// whether a spare is ready.
    #[cfg(test)]
    pub(crate) fn wait_ready(&self) -> bool {
        let mut state = self.lock();
        while matches!(*state, State::Queued | State::Running) {
            state = self.settled.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        matches!(*state, State::Ready { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_leaves_room_on_the_disk() {
        const GIB: u64 = 1 << 30;
        // 100 GiB file system: a 1 GiB spare needs 5 GiB left after it.
        assert!(leaves_room(10 * GIB, 100 * GIB, GIB));
        assert!(leaves_room(6 * GIB, 100 * GIB, GIB));
        assert!(!leaves_room(6 * GIB - 1, 100 * GIB, GIB));
        // 10 GiB file system: as much again as the spare.
        assert!(leaves_room(2 * GIB, 10 * GIB, GIB));
        assert!(!leaves_room(2 * GIB - 1, 10 * GIB, GIB));
        assert!(!leaves_room(0, 10 * GIB, GIB));
    }

    #[test]
    fn space_reads_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = space(dir.path()).unwrap();
        assert!(total > 0 && free <= total, "{free} of {total}");
        assert!(space(&dir.path().join("missing")).is_err());
    }
}
