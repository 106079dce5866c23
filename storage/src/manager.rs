//! Every partition log of one broker under one data directory, in
//! `DATA_DIR/<topic>-<partition>/`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Log, LogConfig, Result};

/// Opens, creates and deletes partition logs.
#[derive(Debug)]
pub struct LogManager {
    _todo: (),
}

impl LogManager {
    /// Opens every `<topic>-<partition>` directory under `data_dir` with
    /// `default_config` (callers fix configs later with `Log::set_config`).
    pub fn open(_data_dir: impl Into<PathBuf>, _default_config: LogConfig) -> Result<LogManager> {
        todo!()
    }
    pub fn get(&self, _topic: &str, _partition: i32) -> Option<Arc<Log>> {
        todo!()
    }
    /// Returns the existing log or creates an empty one with `config`.
    pub fn get_or_create(&self, _topic: &str, _partition: i32, _config: LogConfig) -> Result<Arc<Log>> {
        todo!()
    }
    /// Closes and removes the partition's directory.
    pub fn delete(&self, _topic: &str, _partition: i32) -> Result<()> {
        todo!()
    }
    /// Every open log, with its topic and partition.
    pub fn all(&self) -> Vec<(String, i32, Arc<Log>)> {
        todo!()
    }
    /// Runs `Log::tick` on every log.
    pub fn tick(&self, _now_ms: i64) -> Result<()> {
        todo!()
    }
    /// Flushes and closes every log.
    pub fn close(&self) -> Result<()> {
        todo!()
    }
}
