//! Writes that fail part-way (here: the process's file size limit, as a
//! full disk would) must leave nothing behind that a later open rejects
//! or serves, and lose nothing acknowledged.
//!
//! Its own test binary: the limit applies to the whole process, so the
//! tests here take turns ([`LIMIT`]).

mod common;

use std::sync::Mutex;

use common::{batch, read_all, small_config};
use runnel_storage::Log;

/// Held by a test while it may change the file size limit.
static LIMIT: Mutex<()> = Mutex::new(());

/// Runs `f` with the process's file size limit at `bytes`.
#[allow(unsafe_code)]
fn with_file_size_limit<T>(bytes: u64, f: impl FnOnce() -> T) -> T {
    let set = |limit: u64| {
        let rlimit = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid resource and a pointer to a live
        // rlimit; signal with a valid signal number and SIG_IGN. Without
        // SIG_IGN, crossing the limit would kill the process (SIGXFSZ)
        // instead of failing the write with EFBIG.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit), 0);
        }
    };
    set(bytes);
    let out = f();
    set(libc::RLIM_INFINITY);
    out
}

#[test]
fn a_batch_cut_short_by_a_failed_write_is_not_left_in_the_segment() {
    // Without blocks reserved ahead nothing cut the half batch off; with
    // them, the close's trim of the reservation happened to.
    for preallocate in [false, true] {
        cut_short(preallocate);
    }
}

fn cut_short(preallocate: bool) {
    let _one_at_a_time = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = runnel_storage::LogConfig {
        preallocate,
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let one = batch(0, 20, 1000).len() as u64;
    log.append_as_leader(batch(0, 20, 1000), 0).unwrap();
    log.append_as_leader(batch(1, 20, 1000), 0).unwrap();
    let failed = with_file_size_limit(2 * one + one / 2, || {
        log.append_as_leader(batch(2, 20, 1000), 0)
    });
    assert!(failed.is_err(), "the write past the limit failed");
    assert_eq!(log.log_end_offset(), 40);
    let before = read_all(&log, 0);
    assert_eq!(before.len(), 40);
    // A clean close, then an open that trusts the segment up to its
    // length: half a batch there made it refuse the log.
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.log_end_offset(), 40);
    assert_eq!(read_all(&log, 0), before);
    assert_eq!(
        log.append_as_leader(batch(3, 20, 1000), 0)
            .unwrap()
            .base_offset,
        40
    );
}

/// A follower's truncation inside a closed segment copies the kept
/// prefix of that segment before removing anything: a copy that fails
/// (here: the file size limit, as a full disk would) leaves the log as it
/// was, serving and taking writes, and the cut can be made again. It used
/// to unlink the segments above the cut first, then fail the log, and the
/// broker stopped; on its restart the same cut failed the same way.
#[test]
fn a_truncation_whose_copy_fails_changes_nothing() {
    let _one_at_a_time = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 20, 1000).len() as u64;
    let config = runnel_storage::LogConfig {
        preallocate: false,
        ..small_config(one * 2)
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..5 {
        log.append_as_leader(batch(i, 20, 1000), 0).unwrap();
    }
    assert_eq!(log.segment_base_offsets(), vec![0, 40, 80]);
    let all = read_all(&log, 0);
    // Offset 30 is in the first segment's second batch: the cut keeps its
    // first batch, copied to a new file, which the limit stops.
    let failed = with_file_size_limit(one / 2, || log.truncate_to(30));
    assert!(failed.is_err());
    assert!(!log.has_failed());
    assert_eq!(log.segment_base_offsets(), vec![0, 40, 80]);
    assert_eq!(read_all(&log, 0), all);
    assert_eq!(
        log.append_as_leader(batch(9, 20, 1000), 0)
            .unwrap()
            .base_offset,
        100
    );
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.log_end_offset(), 120);
    log.truncate_to(30).unwrap();
    assert_eq!(log.log_end_offset(), 20);
    assert_eq!(read_all(&log, 0), all[..20].to_vec());
}
