//! Beat's last-run times in a local JSON file (used where the broker is AMQP): an object of
//! entry name → Unix seconds of the tick it last fired for.
//!
//! Writes are atomic and durable: a temporary file in the same directory is written and fsynced,
//! renamed over the state file, and the directory is fsynced, so a crash or power loss leaves either
//! the old or the new file, never half of one. A file that cannot be read or is not a state file
//! never stops beat from leading: it counts as "no state" (the copy the last leader mirrored to the
//! broker still counts), is moved aside as `<file>.corrupt-<UTC time>` for a person to look at, and
//! a warning says so.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

use crate::error::{BeatError, Result};

/// Makes temporary names unique among the writers of one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The state file at a path.
#[derive(Debug, Clone)]
pub(crate) struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state kept in `path` (created on the first write).
    pub(crate) fn new(path: &Path) -> Self {
        StateFile {
            path: path.to_path_buf(),
        }
    }

    /// Every entry's last recorded tick. A missing file is an empty state; so is an unreadable or
    /// corrupt one, which is moved aside with a warning.
    pub(crate) fn read(&self) -> HashMap<String, i64> {
        let problem = match std::fs::read(&self.path) {
            Ok(raw) => match serde_json::from_slice(&raw) {
                Ok(state) => return state,
                Err(e) => format!("is not a beat state file ({e})"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
            Err(e) => format!("cannot be read ({e})"),
        };
        match self.set_aside() {
            Ok(aside) => warn!(
                file = %self.path.display(),
                moved_to = %aside.display(),
                "beat: the state file {problem}; starting without local state (moved it aside)"
            ),
            Err(e) => warn!(
                file = %self.path.display(),
                "beat: the state file {problem}; starting without local state (could not move it aside: {e})"
            ),
        }
        HashMap::new()
    }

    /// Renames the state file to `<file>.corrupt-<UTC time>` (plus a number if that exists).
    fn set_aside(&self) -> std::io::Result<PathBuf> {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let mut aside = self.sibling(&format!(".corrupt-{stamp}"));
        let mut n = 1u32;
        while aside.symlink_metadata().is_ok() && n < 1000 {
            aside = self.sibling(&format!(".corrupt-{stamp}-{n}"));
            n += 1;
        }
        std::fs::rename(&self.path, &aside)?;
        Ok(aside)
    }

    /// `<file><suffix>`, in the file's directory.
    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    }

    /// The directory holding the file (`.` for a bare file name).
    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    /// Replaces the whole state, atomically and durably (see the module doc).
    pub(crate) fn write(&self, all: &HashMap<String, i64>) -> Result<()> {
        let raw = serde_json::to_vec(all).map_err(|e| BeatError::State(e.to_string()))?;
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.sibling(&format!(".tmp-{}-{seq}", std::process::id()));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&raw)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &self.path)?;
            // The rename itself is durable only once the directory is.
            File::open(self.dir())?.sync_all()
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            BeatError::State(format!("cannot write {}: {e}", self.path.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of the test's own, removed at the end.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let d = std::env::temp_dir().join(format!("beat-state-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir(&d).unwrap();
            Dir(d)
        }

        /// The names in the directory, sorted.
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writes_replace_the_file_whole_and_survive_a_reopen() {
        let dir = Dir::new();
        let path = dir.0.join("state.json");
        let s = StateFile::new(&path);
        assert!(s.read().is_empty());
        s.write(&HashMap::from([("a".to_owned(), 100), ("b".to_owned(), 5)]))
            .unwrap();
        // A link to the old file keeps the old content: the new one was renamed into place, not
        // written over the old bytes.
        std::fs::hard_link(&path, dir.0.join("old")).unwrap();
        s.write(&HashMap::from([("a".to_owned(), 200)])).unwrap();
        let again = StateFile::new(&path).read();
        assert_eq!(again, HashMap::from([("a".to_owned(), 200)]));
        let old: HashMap<String, i64> =
            serde_json::from_slice(&std::fs::read(dir.0.join("old")).unwrap()).unwrap();
        assert_eq!(old.get("b"), Some(&5));
        // No temporary file is left behind.
        assert_eq!(dir.names(), ["old", "state.json"]);
    }

    #[test]
    fn a_corrupt_file_is_no_state_and_is_moved_aside() {
        let dir = Dir::new();
        let path = dir.0.join("state.json");
        std::fs::write(&path, "{\"a\": 1, trunc").unwrap();
        let s = StateFile::new(&path);
        assert!(s.read().is_empty());
        let names = dir.names();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("state.json.corrupt-"), "{names:?}");
        assert_eq!(
            std::fs::read(dir.0.join(&names[0])).unwrap(),
            b"{\"a\": 1, trunc"
        );
        // Writing works again, and a second bad file gets a name of its own.
        s.write(&HashMap::from([("a".to_owned(), 7)])).unwrap();
        assert_eq!(s.read().get("a"), Some(&7));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(s.read().is_empty());
        assert_eq!(dir.names().len(), 2, "{:?}", dir.names());
    }

    #[test]
    fn an_unreadable_file_is_no_state() {
        let dir = Dir::new();
        let path = dir.0.join("state.json");
        // A directory where the file should be: reading it fails with an I/O error.
        std::fs::create_dir(&path).unwrap();
        let s = StateFile::new(&path);
        assert!(s.read().is_empty());
        s.write(&HashMap::from([("a".to_owned(), 3)])).unwrap();
        assert_eq!(s.read().get("a"), Some(&3));
    }
}
