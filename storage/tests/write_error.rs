//! A write that fails halfway through a batch (here: the process's file
//! size limit, as a full disk would) must leave nothing behind that a
//! later open rejects or serves.
//!
//! Its own test binary: the limit applies to the whole process.

mod common;

use common::{batch, read_all, small_config};
use runnel_storage::Log;

#[test]
fn a_batch_cut_short_by_a_failed_write_is_not_left_in_the_segment() {
    // Without blocks reserved ahead nothing cut the half batch off; with
    // them, the close's trim of the reservation happened to.
    for preallocate in [false, true] {
        cut_short(preallocate);
    }
}

#[allow(unsafe_code)]
fn cut_short(preallocate: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = runnel_storage::LogConfig {
        preallocate,
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let one = batch(0, 20, 1000).len() as u64;
    log.append_as_leader(batch(0, 20, 1000), 0).unwrap();
    log.append_as_leader(batch(1, 20, 1000), 0).unwrap();
    let limit = 2 * one + one / 2;
    // SAFETY: setrlimit and signal with valid arguments; this binary has
    // no other test that the limit or the ignored signal could affect.
    // Without SIG_IGN, crossing the limit would kill the process
    // (SIGXFSZ) instead of failing the write with EFBIG.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let rlimit = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit), 0);
    }
    let failed = log.append_as_leader(batch(2, 20, 1000), 0);
    // SAFETY: as above.
    unsafe {
        let rlimit = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit), 0);
    }
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
