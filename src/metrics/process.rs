//! Process figures read at scrape time: resident memory, open files and
//! threads from `/proc/self` (Linux; zero elsewhere), and the tokio
//! runtime's worker and task counts.

/// What the process uses right now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// Resident set size (bytes).
    pub resident_memory_bytes: u64,
    /// Virtual memory size (bytes).
    pub virtual_memory_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors (0 when unknown).
    pub max_fds: u64,
    /// OS threads.
    pub threads: u64,
    /// Tokio worker threads.
    pub tokio_workers: u64,
    /// Tokio tasks spawned and not yet finished.
    pub tokio_alive_tasks: u64,
    /// Tasks waiting in the runtime's global queue.
    pub tokio_global_queue_depth: u64,
}

impl ProcessStats {
    /// Reads the figures; tokio's only when called inside a runtime.
    pub fn read() -> Self {
        let mut s = Self::default();
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            for line in status.lines() {
                let kb = |rest: &str| {
                    rest.split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if let Some(rest) = line.strip_prefix("VmRSS:") {
                    s.resident_memory_bytes = kb(rest) * 1024;
                } else if let Some(rest) = line.strip_prefix("VmSize:") {
                    s.virtual_memory_bytes = kb(rest) * 1024;
                } else if let Some(rest) = line.strip_prefix("Threads:") {
                    s.threads = kb(rest);
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Less the descriptor that lists them.
            s.open_fds = dir.count().saturating_sub(1) as u64;
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            s.max_fds = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let m = handle.metrics();
            s.tokio_workers = m.num_workers() as u64;
            s.tokio_alive_tasks = m.num_alive_tasks() as u64;
            s.tokio_global_queue_depth = m.global_queue_depth() as u64;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_this_process() {
        let s = ProcessStats::read();
        if cfg!(target_os = "linux") {
            assert!(s.resident_memory_bytes > 0);
            assert!(s.open_fds > 0);
            assert!(s.threads > 0);
        }
        assert!(s.tokio_workers >= 1);
    }
}
