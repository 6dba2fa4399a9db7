//! Beat's last-run times in a local JSON file (used where the broker is AMQP): an object of
//! entry name → Unix seconds of the tick it last fired for, replaced atomically (temp file + rename)
//! on every record so a crash leaves either the old or the new file, never half of one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{BeatError, Result};

/// The state file at a path.
#[derive(Debug, Clone)]
pub(crate) struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state kept in `path` (created on the first record).
    pub(crate) fn new(path: &Path) -> Self {
        StateFile {
            path: path.to_path_buf(),
        }
    }

    /// Every entry's last recorded tick; a missing file is an empty state.
    pub(crate) fn read(&self) -> Result<HashMap<String, i64>> {
        match std::fs::read(&self.path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
                BeatError::State(format!(
                    "{} is not a beat state file: {e}",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(BeatError::State(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Sets `entry`'s last tick to `tick` unless it already is at `tick` or later (`None` then);
    /// returns the whole new state.
    pub(crate) fn record(&self, entry: &str, tick: i64) -> Result<Option<HashMap<String, i64>>> {
        let mut all = self.read()?;
        if all.get(entry).is_some_and(|t| *t >= tick) {
            return Ok(None);
        }
        all.insert(entry.to_owned(), tick);
        self.write(&all)?;
        Ok(Some(all))
    }

    /// Replaces the whole state.
    pub(crate) fn write(&self, all: &HashMap<String, i64>) -> Result<()> {
        let fail = |e: std::io::Error| {
            BeatError::State(format!("cannot write {}: {e}", self.path.display()))
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let raw = serde_json::to_vec(all).map_err(|e| BeatError::State(e.to_string()))?;
        std::fs::write(&tmp, raw).map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_newer_ticks_and_survives_a_reopen() {
        let path = std::env::temp_dir().join(format!("beat-state-{}.json", uuid::Uuid::new_v4()));
        let s = StateFile::new(&path);
        assert!(s.read().unwrap().is_empty());
        assert!(s.record("a", 100).unwrap().is_some());
        assert!(s.record("a", 100).unwrap().is_none());
        assert!(s.record("a", 99).unwrap().is_none());
        assert_eq!(s.record("b", 5).unwrap().map(|m| m.len()), Some(2));
        let again = StateFile::new(&path).read().unwrap();
        assert_eq!(again.get("a"), Some(&100));
        assert_eq!(again.get("b"), Some(&5));
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(s.read(), Err(BeatError::State(_))));
        std::fs::remove_file(&path).unwrap();
    }
}
