//! Chords and saved groups on the Redis result backend, with Celery 5.7's native join keys
//! (`celery-taskset-meta-<gid>.j/.t/.s/.d/.c`), so our workers and Python's can share one chord.
//!
//! Cost per header member: one script call (add the entry, count, maybe claim). The member that
//! completes the count gets every entry back in the same reply (one O(n) read in all), then makes one
//! more call to clear the join. No polling, no `celery.chord_unlock`.

use std::sync::OnceLock;

use redis::Script;

use super::RedisBackend;
use crate::backend::chord::{
    group_document, parse_group_document, ChordEntry, ChordJoin, ChordPart,
};
use crate::error::Result;

/// Celery's prefix of group keys.
const GROUP_KEYPREFIX: &str = "celery-taskset-meta-";
/// How long a claim lives if its holder dies before clearing it (its redelivery re-enters it sooner).
const CLAIM_EXPIRES_SECS: u64 = 30;
/// How long the `done` marker keeps late duplicates out.
const DONE_EXPIRES_SECS: u64 = 3600;

fn part_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(include_str!("scripts/chord_part.lua")))
}

fn done_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(include_str!("scripts/chord_done.lua")))
}

/// The reply of `chord_part.lua`.
type PartReply = (i64, Option<i64>, Option<i64>, i64, Vec<Vec<u8>>);

impl RedisBackend {
    /// `<global prefix>celery-taskset-meta-<gid><suffix>` (`…-{<gid>}<suffix>` on a cluster).
    fn group_key(&self, group_id: &str, suffix: &str) -> String {
        let global = self
            .task_prefix
            .strip_suffix(super::TASK_KEYPREFIX)
            .unwrap_or("");
        if self.cluster.is_some() {
            // One hash tag per group: the join scripts touch several of its keys at once.
            format!("{global}{GROUP_KEYPREFIX}{{{group_id}}}{suffix}")
        } else {
            format!("{global}{GROUP_KEYPREFIX}{group_id}{suffix}")
        }
    }

    pub(super) async fn chord_set_size(&self, group_id: &str, size: usize) -> Result<()> {
        self.check_open()?;
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.group_key(group_id, ".c")).ignore();
        let skey = self.group_key(group_id, ".s");
        if self.expires > 0 {
            pipe.cmd("SET")
                .arg(&skey)
                .arg(size)
                .arg("EX")
                .arg(self.expires);
        } else {
            pipe.cmd("SET").arg(&skey).arg(size);
        }
        pipe.ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub(super) async fn chord_part(&self, part: &ChordPart) -> Result<ChordJoin> {
        self.check_open()?;
        let g = &part.group_id;
        let (ready, diff, size, claimed, raw): PartReply = part_script()
            .key(self.group_key(g, ".j"))
            .key(self.group_key(g, ".t"))
            .key(self.group_key(g, ".s"))
            .key(self.group_key(g, ".d"))
            .key(self.group_key(g, ""))
            .key(self.group_key(g, ".c"))
            .arg(&part.task_id)
            .arg(part.entry_json())
            .arg(part.score())
            .arg(self.expires)
            .arg(CLAIM_EXPIRES_SECS)
            .arg(part.claim_token())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if ready < 0 {
            return Ok(ChordJoin::Finished);
        }
        if claimed == 1 {
            let entries = raw
                .iter()
                .map(|b| ChordEntry::decode(b))
                .collect::<Result<Vec<_>>>()?;
            return Ok(ChordJoin::Complete {
                entries,
                claim: part.claim_token(),
            });
        }
        // Complete but not ours, or still waiting: tell them apart by the size.
        match (size, diff) {
            (Some(s), d) if ready == s + d.unwrap_or(0) => Ok(ChordJoin::ClaimedElsewhere),
            _ => Ok(ChordJoin::Waiting {
                ready: ready as u64,
            }),
        }
    }

    pub(super) async fn chord_clear(&self, group_id: &str, claim: &str) -> Result<()> {
        self.check_open()?;
        let _cleared: i64 = done_script()
            .key(self.group_key(group_id, ".c"))
            .key(self.group_key(group_id, ".j"))
            .key(self.group_key(group_id, ".t"))
            .key(self.group_key(group_id, ".s"))
            .key(self.group_key(group_id, ".d"))
            .arg(claim)
            .arg(DONE_EXPIRES_SECS.max(self.expires.min(86_400)))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    pub(super) async fn group_save(&self, group_id: &str, task_ids: &[String]) -> Result<()> {
        self.check_open()?;
        let key = self.group_key(group_id, "");
        let doc = group_document(group_id, task_ids);
        let mut pipe = redis::pipe();
        if self.expires > 0 {
            pipe.cmd("SETEX").arg(&key).arg(self.expires).arg(&doc);
        } else {
            pipe.cmd("SET").arg(&key).arg(&doc);
        }
        pipe.ignore();
        pipe.cmd("PUBLISH").arg(&key).arg(&doc).ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub(super) async fn group_restore(&self, group_id: &str) -> Result<Option<Vec<String>>> {
        self.check_open()?;
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.group_key(group_id, ""))
            .query_async(&mut self.conn.clone())
            .await?;
        value
            .map(|v| parse_group_document(group_id, &v))
            .transpose()
    }

    pub(super) async fn group_forget(&self, group_id: &str) -> Result<()> {
        self.check_open()?;
        redis::cmd("DEL")
            .arg(self.group_key(group_id, ""))
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
