//! The in-process equivalent of the Redis chord join, for the `memory://` backend: the same rules
//! (entries deduplicated by `tid:index`, a re-entrant claim for the completing member, a `done`
//! marker after the body was sent), under one mutex instead of a Lua script.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::chord::{ChordEntry, ChordJoin, ChordPart};
use crate::error::Result;

/// Every chord join of one named memory backend.
#[derive(Default)]
pub(super) struct MemoryChords {
    chords: Mutex<HashMap<String, Join>>,
    groups: Mutex<HashMap<String, Vec<String>>>,
}

#[derive(Default)]
struct Join {
    size: Option<usize>,
    /// (score, entry) in arrival order; sorted by score when read.
    entries: Vec<(f64, ChordEntry)>,
    members: HashSet<String>,
    claim: Option<String>,
    done: bool,
}

impl MemoryChords {
    fn chords(&self) -> std::sync::MutexGuard<'_, HashMap<String, Join>> {
        self.chords.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_size(&self, group_id: &str, size: usize) {
        let mut chords = self.chords();
        let join = chords.entry(group_id.to_owned()).or_default();
        // A reused group id is a new run: like Celery, only the claim is cleared.
        join.claim = None;
        join.done = false;
        join.size = Some(size);
    }

    pub(super) fn part_return(&self, part: &ChordPart) -> Result<ChordJoin> {
        let mut chords = self.chords();
        let join = chords.entry(part.group_id.clone()).or_default();
        if join.done {
            return Ok(ChordJoin::Finished);
        }
        let member = format!("{}:{}", part.task_id, part.score());
        if join.members.insert(member) {
            let score = part.group_index.map_or(f64::INFINITY, |i| i as f64);
            join.entries.push((
                score,
                ChordEntry {
                    task_id: part.task_id.clone(),
                    state: part.state.clone(),
                    result: part.result.clone(),
                },
            ));
        }
        let ready = join.entries.len();
        if join.size != Some(ready) {
            return Ok(ChordJoin::Waiting {
                ready: ready as u64,
            });
        }
        let token = part.claim_token();
        match &join.claim {
            Some(c) if *c != token => return Ok(ChordJoin::ClaimedElsewhere),
            _ => join.claim = Some(token.clone()),
        }
        let mut sorted: Vec<&(f64, ChordEntry)> = join.entries.iter().collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(ChordJoin::Complete {
            entries: sorted.into_iter().map(|(_, e)| e.clone()).collect(),
            claim: token,
        })
    }

    pub(super) fn done(&self, group_id: &str, claim: &str) {
        let mut chords = self.chords();
        if let Some(join) = chords.get_mut(group_id) {
            if join.claim.as_deref() == Some(claim) {
                *join = Join {
                    done: true,
                    ..Join::default()
                };
            }
        }
    }

    pub(super) fn save_group(&self, group_id: &str, task_ids: &[String]) {
        self.groups().insert(group_id.to_owned(), task_ids.to_vec());
    }

    pub(super) fn restore_group(&self, group_id: &str) -> Option<Vec<String>> {
        self.groups().get(group_id).cloned()
    }

    pub(super) fn forget_group(&self, group_id: &str) {
        self.groups().remove(group_id);
    }
}
