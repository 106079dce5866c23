//! The `runnel` binary: `runnel server` runs a broker; every other
//! subcommand is a client of a running cluster (see `runnel --help`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tune_malloc();
    let job = match cli::Job::new(cli::Cli::parse()) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // The perf tools choose their threads (`cli::Command::worker_threads`;
    // `Some(0)`: the main thread alone); a server takes its count from
    // `worker_threads`.
    let mut builder = match job.worker_threads() {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let abandon = job.may_abandon_blocking();
    let code = match runtime.block_on(job.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    if abandon {
        runtime.shutdown_background();
    }
    code
}

/// glibc's malloc serves blocks over its (adaptive) mmap threshold with
/// fresh mappings and trims the heap top past 128 KiB: batches of 64 KiB
/// to a few MiB, allocated and freed thousands of times a second, then
/// page-fault and zero-fill anew each time (about a third of the broker's
/// CPU at 1 KiB produce, `benches/RESULTS.md`). Keep them in the heap and
/// keep up to 64 MiB of free heap before giving it back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
