//! The helpers every part of the config validates with: one error shape (file, key, reason),
//! paths anchored at the config file, durations and sizes in range.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ByteSize, ConfigError};

/// Validates raw config into its checked types; each module that owns a part of the config
/// validates it with this (`SinkConfig::validate`, `SourceConfig::validate`, ...).
pub struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) base: &'a Path,
}

impl Validator<'_> {
    pub fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: None,
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// A path from the config, absolute, anchored at the config file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    pub fn positive(&self, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            return Err(self.err(key, "must be above zero"));
        }
        Ok(d)
    }

    pub fn size_between(
        &self,
        key: &str,
        v: ByteSize,
        min: u64,
        max: u64,
    ) -> Result<usize, ConfigError> {
        if v.0 < min || v.0 > max {
            return Err(self.err(
                key,
                format!("must be between {min} and {max} bytes, got {}", v.0),
            ));
        }
        Ok(v.0 as usize)
    }
}
