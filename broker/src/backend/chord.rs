//! Chord joins and saved groups, in the form Celery's Redis backend keeps them.
//!
//! A chord header member, once its own result is stored, hands its outcome to the backend
//! ([`super::ResultBackend::chord_part_return`]). Each outcome is one *entry*, `[1, tid, state,
//! result]` as JSON, kept under the group id and scored by the member's `group_index`. The member
//! whose entry completes the count (the size the producer set with
//! [`super::ResultBackend::set_chord_size`], plus any `.t` additions) *claims* the join and gets every
//! entry back in index order; it sends the body and then calls
//! [`super::ResultBackend::chord_done`], which clears the join data and leaves a `done` marker so a
//! late duplicate cannot start the chord again.
//!
//! Entries are deduplicated by `tid:index`, so a member redelivered after a crash is never counted
//! twice. The claim token is derived from the claiming member (`celerity:<tid>:<index>`), so the same
//! member delivered again after a crash re-enters its own claim instead of finding the join locked.
//!
//! A saved group (`GroupResult.save()`) is `{"result": [[gid, null], [[[tid, null], null], …]]}`.

use serde_json::{json, Value};

use super::meta::State;
use crate::error::{BrokerError, Result};
use crate::pyjson;

/// One header member's outcome, handed to the join.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    pub group_id: String,
    pub task_id: String,
    /// The member's position; `None` sorts last (Celery scores it `+inf`).
    pub group_index: Option<i64>,
    pub state: State,
    /// The return value, or the serialized exception for FAILURE/REVOKED.
    pub result: Value,
}

impl ChordPart {
    /// The entry stored in the join: `[1, tid, state, result]` in Python's JSON style.
    pub fn entry_json(&self) -> Vec<u8> {
        pyjson::to_vec(&json!([1, self.task_id, self.state.as_str(), self.result]))
    }

    /// The dedupe member and sort score, as Celery writes them (`+inf` without an index).
    pub fn score(&self) -> String {
        self.group_index
            .map_or_else(|| "+inf".to_owned(), |i| i.to_string())
    }

    /// The claim token of this member: stable across redeliveries of the same member.
    pub fn claim_token(&self) -> String {
        format!("celerity:{}:{}", self.task_id, self.score())
    }
}

/// One entry read back from a completed join.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordEntry {
    pub task_id: String,
    pub state: State,
    pub result: Value,
}

impl ChordEntry {
    /// Reads `[1, tid, state, result]`.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| BrokerError::malformed(format_args!("chord entry is not JSON: {e}")))?;
        match v {
            Value::Array(a) if a.len() == 4 => {
                let mut it = a.into_iter().skip(1);
                let (tid, state, result) = (it.next(), it.next(), it.next());
                match (tid, state) {
                    (Some(Value::String(task_id)), Some(Value::String(state))) => Ok(ChordEntry {
                        task_id,
                        state: State::parse(&state),
                        result: result.unwrap_or(Value::Null),
                    }),
                    _ => Err(BrokerError::malformed(
                        "chord entry: expected [1, task_id, state, result]",
                    )),
                }
            }
            _ => Err(BrokerError::malformed(
                "chord entry: expected [1, task_id, state, result]",
            )),
        }
    }
}

/// What the join says after a member's outcome was added.
#[derive(Debug, Clone, PartialEq)]
pub enum ChordJoin {
    /// Not every member has returned yet (or the size is not known).
    Waiting { ready: u64 },
    /// This member completed the count and holds the claim: send the body, then call `chord_done`.
    Complete {
        entries: Vec<ChordEntry>,
        claim: String,
    },
    /// The count is complete but another member holds the claim.
    ClaimedElsewhere,
    /// The chord already finished (its body was sent); nothing to do.
    Finished,
}

/// The saved form of a group: `{"result": [[gid, null], [[[tid, null], null], …]]}`.
pub fn group_document(group_id: &str, task_ids: &[String]) -> Vec<u8> {
    let children: Vec<Value> = task_ids
        .iter()
        .map(|id| json!([[id, null], null]))
        .collect();
    pyjson::to_vec(&json!({"result": [[group_id, null], children]}))
}

/// Reads a saved group: the member ids in order. Nested groups are refused.
pub fn parse_group_document(group_id: &str, bytes: &[u8]) -> Result<Vec<String>> {
    let bad =
        || BrokerError::malformed(format_args!("saved group {group_id} is not a GroupResult"));
    let v: Value = serde_json::from_slice(bytes).map_err(|_| bad())?;
    let children = v
        .get("result")
        .and_then(|r| r.get(1))
        .and_then(Value::as_array)
        .ok_or_else(bad)?;
    children
        .iter()
        .map(|c| {
            // [[tid, parent], null] for a plain result; [[gid, parent], [...]] for a nested group.
            if c.get(1).is_some_and(|x| !x.is_null()) {
                return Err(BrokerError::malformed(format_args!(
                    "saved group {group_id} has a nested group; not supported"
                )));
            }
            c.get(0)
                .and_then(|t| t.get(0))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(bad)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_in_celery_form() {
        let p = ChordPart {
            group_id: "g".into(),
            task_id: "t1".into(),
            group_index: Some(3),
            state: State::Success,
            result: json!(5),
        };
        assert_eq!(
            String::from_utf8(p.entry_json()).unwrap(),
            r#"[1, "t1", "SUCCESS", 5]"#
        );
        assert_eq!(p.score(), "3");
        let e = ChordEntry::decode(&p.entry_json()).unwrap();
        assert_eq!(
            (e.task_id.as_str(), e.state, e.result),
            ("t1", State::Success, json!(5))
        );
        assert!(ChordEntry::decode(b"[1, 2]").is_err());
    }

    #[test]
    fn group_document_matches_celery() {
        let doc = group_document("g1", &["a".into(), "b".into()]);
        assert_eq!(
            String::from_utf8(doc.clone()).unwrap(),
            r#"{"result": [["g1", null], [[["a", null], null], [["b", null], null]]]}"#
        );
        assert_eq!(parse_group_document("g1", &doc).unwrap(), vec!["a", "b"]);
        assert!(parse_group_document("g1", b"{}").is_err());
    }
}
