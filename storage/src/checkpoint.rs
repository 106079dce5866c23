//! Small checkpoint files in a partition directory (`recovery-point`,
//! `log-start-offset`, `high-watermark`, `leader-epoch-checkpoint`).
//!
//! Format (text, like Kafka's): a version line `0`, then one value per
//! line. Writes go to `<name>.tmp`, are fsync'd, renamed over the old file,
//! and the directory is fsync'd, so a crash leaves the old or the new file.
//! A file that does not parse is treated as missing.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::index_file::io_err;
use crate::Result;

pub(crate) const RECOVERY_POINT: &str = "recovery-point";
pub(crate) const LOG_START_OFFSET: &str = "log-start-offset";
pub(crate) const HIGH_WATERMARK: &str = "high-watermark";
pub(crate) const LEADER_EPOCH: &str = "leader-epoch-checkpoint";
/// Present only between a clean `close` and the next open.
pub(crate) const CLEAN_SHUTDOWN: &str = ".clean-shutdown";

const VERSION: &str = "0";

/// Atomically replaces `dir/name` with the version line and `lines`.
pub(crate) fn write(dir: &Path, name: &str, lines: &[String]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut text = String::from(VERSION);
    text.push('\n');
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    #[cfg(test)]
    for hook in BEFORE_SYNC.read().unwrap_or_else(|e| e.into_inner()).iter() {
        hook(&tmp);
    }
    f.sync_all().map_err(io_err(&tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// The value lines of `dir/name`; `None` if missing or of another version.
pub(crate) fn read(dir: &Path, name: &str) -> Result<Option<Vec<String>>> {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mut lines = text.lines();
    if lines.next() != Some(VERSION) {
        tracing::warn!(path = %path.display(), "ignoring checkpoint of unknown version");
        return Ok(None);
    }
    Ok(Some(lines.map(str::to_string).collect()))
}

/// Reads a single-offset checkpoint.
pub(crate) fn read_offset(dir: &Path, name: &str) -> Result<Option<i64>> {
    Ok(read(dir, name)?.and_then(|lines| match lines.as_slice() {
        [one] => one.trim().parse().ok(),
        _ => None,
    }))
}

pub(crate) fn write_offset(dir: &Path, name: &str, offset: i64) -> Result<()> {
    write(dir, name, &[offset.to_string()])
}

/// A unit-test hook, run with the temporary file's path just before a
/// checkpoint's fsync (tests hold a write there to see who waits on it),
/// and with the directory's path before a directory's fsync.
#[cfg(test)]
pub(crate) type SyncHook = Box<dyn Fn(&Path) + Send + Sync>;

#[cfg(test)]
pub(crate) static BEFORE_SYNC: std::sync::RwLock<Vec<SyncHook>> =
    std::sync::RwLock::new(Vec::new());

/// fsyncs a directory so creations, renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    for hook in BEFORE_SYNC.read().unwrap_or_else(|e| e.into_inner()).iter() {
        hook(dir);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_offset(dir.path(), "x").unwrap(), None);
        write_offset(dir.path(), "x", 42).unwrap();
        assert_eq!(read_offset(dir.path(), "x").unwrap(), Some(42));
        std::fs::write(dir.path().join("x"), b"0\nnot a number\n").unwrap();
        assert_eq!(read_offset(dir.path(), "x").unwrap(), None);
        std::fs::write(dir.path().join("x"), [0xff, 0xfe, 0x00]).unwrap();
        assert_eq!(read_offset(dir.path(), "x").unwrap(), None);
    }
}
