//! Settling a consumer channel's deliveries in groups: one `basic.ack` with `multiple` for a run of
//! finished deliveries instead of one frame (and one broker round of work) each.
//!
//! Every delivery the channel hands out is recorded here, in delivery-tag order, before the worker
//! sees it. A job that finishes marks its tag and waits; whichever caller finds no flush under way
//! starts a flusher task which, until nothing finished is left, takes what finished so far:
//! - the longest run of finished acks at the low end of the open tags goes out as one
//!   `basic.ack(multiple)` on the highest tag of the run (it settles exactly that run: every lower tag
//!   is either in the run or already settled);
//! - every other finished tag (after a job still running, or a reject) goes out on its own, in tag
//!   order, so a long job never holds back the acks of the jobs that finished after it.
//!
//! Frames are queued on the channel in that order by the flusher alone, so a multiple ack can never
//! overtake a reject of a tag it covers. Each caller returns once its own frame is written, as a
//! single ack would: acks stay late. On a dead channel every waiter gets an error (the broker has
//! requeued those messages already). A frame not written within [`FRAME_TIMEOUT`] counts as a dead
//! channel too (lapin can leave a frame queued behind a connection that just died); the channel is
//! then closed, so its consumer reconnects and the broker requeues what it held.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Channel;
use tokio::sync::oneshot;

use crate::error::{BrokerError, Result};

/// How long a settle frame may take to be written before the channel is given up.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How a finished delivery is to be settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Reject { requeue: bool },
}

/// A finished delivery waiting for its frame.
struct Done {
    how: Settle,
    waiter: oneshot::Sender<Result<()>>,
}

struct State {
    /// Delivered and not yet settled, by tag: `None` while the job runs.
    open: BTreeMap<u64, Option<Done>>,
    /// Every tag below this one has been recorded. Tags on a channel count up from 1, but with
    /// several queues on one channel the merged stream can hand them out of order; a multiple ack
    /// must not cover a delivery the worker has not even seen.
    recorded_below: u64,
    /// Tags recorded ahead of `recorded_below`.
    early: BTreeSet<u64>,
    /// A caller is sending frames; newly finished tags wait for its next round.
    flushing: bool,
    /// The channel died: settle nothing more.
    dead: bool,
}

/// The open deliveries of one consumer channel.
pub(crate) struct AckGroup {
    channel: Channel,
    state: Mutex<State>,
}

/// One round's frames: the multiple ack (highest tag and its waiters), then the single ones.
struct Round {
    run: Option<(u64, Vec<oneshot::Sender<Result<()>>>)>,
    singles: Vec<(u64, Done)>,
}

type Frame<'a> = Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + 'a>>;

impl AckGroup {
    pub(crate) fn new(channel: Channel) -> Arc<Self> {
        Arc::new(AckGroup {
            channel,
            state: Mutex::new(State {
                open: BTreeMap::new(),
                recorded_below: 1,
                early: BTreeSet::new(),
                flushing: false,
                dead: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a delivery handed out by the channel (tags only grow on a channel).
    pub(crate) fn delivered(&self, tag: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.open.insert(tag, None);
        if tag == st.recorded_below {
            st.recorded_below += 1;
            while st.early.remove(&st.recorded_below) {
                st.recorded_below += 1;
            }
        } else if tag > st.recorded_below {
            st.early.insert(tag);
        }
    }

    /// Settles `tag` and returns once its frame is on the wire (or with the error that stopped it).
    pub(crate) async fn settle(self: &Arc<Self>, tag: u64, how: Settle) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut st = self.lock();
            if st.dead {
                return Err(gone());
            }
            match st.open.get_mut(&tag) {
                Some(slot @ None) => *slot = Some(Done { how, waiter: tx }),
                _ => {
                    return Err(BrokerError::Transport {
                        transport: "amqp",
                        message: format!("delivery {tag} was already settled"),
                    })
                }
            }
            !std::mem::replace(&mut st.flushing, true)
        };
        if lead {
            // Its own task: a caller that is dropped mid-flush must not strand the others.
            tokio::spawn(self.clone().flush());
        }
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Sends rounds until nothing finished is left.
    async fn flush(self: Arc<Self>) {
        loop {
            let round = {
                let mut st = self.lock();
                let below = st.recorded_below;
                let round = take_round(&mut st.open, below);
                if round.run.is_none() && round.singles.is_empty() {
                    st.flushing = false;
                    return;
                }
                round
            };
            if let Err(e) = self.send(round).await {
                {
                    let mut st = self.lock();
                    st.dead = true;
                    st.flushing = false;
                    tracing::debug!(error = %e, "amqp: settling on a dead channel");
                    // Waiters of later rounds learn it from their dropped sender.
                    st.open.clear();
                }
                if self.channel.status().connected() {
                    // Stuck rather than closed: close it, so the consumer notices and reconnects.
                    let close = self.channel.close(200, "settling stalled".into());
                    let _ = tokio::time::timeout(FRAME_TIMEOUT, close).await;
                }
                return;
            }
        }
    }

    /// Queues the round's frames in order, then waits until they are written.
    async fn send(&self, round: Round) -> std::result::Result<(), String> {
        let mut frames: Vec<(Frame<'_>, Vec<oneshot::Sender<Result<()>>>)> = Vec::new();
        if let Some((tag, waiters)) = round.run {
            let ack = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: true });
            frames.push((Box::pin(ack), waiters));
        }
        for (tag, done) in round.singles {
            let frame: Frame<'_> = match done.how {
                Settle::Ack => Box::pin(self.channel.basic_ack(tag, BasicAckOptions::default())),
                Settle::Reject { requeue } => Box::pin(
                    self.channel
                        .basic_reject(tag, BasicRejectOptions { requeue }),
                ),
            };
            frames.push((frame, vec![done.waiter]));
        }
        // The first poll queues a frame: poll each once, in order, before waiting for any.
        for (frame, _) in &mut frames {
            if let Poll::Ready(r) =
                std::future::poll_fn(|cx| Poll::Ready(frame.as_mut().poll(cx))).await
            {
                *frame = Box::pin(std::future::ready(r));
            }
        }
        let mut failure = None;
        for (frame, waiters) in frames {
            let outcome = match tokio::time::timeout(FRAME_TIMEOUT, frame).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("not written within {FRAME_TIMEOUT:?}")),
            };
            if let Err(e) = &outcome {
                failure.get_or_insert_with(|| e.clone());
            }
            for w in waiters {
                let _ = w.send(match &outcome {
                    Ok(()) => Ok(()),
                    Err(_) => Err(gone()),
                });
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Takes every finished delivery out of `open`: the leading run of acks (only over tags below
/// `recorded_below`, so never past a delivery not recorded yet), then the rest in tag order.
fn take_round(open: &mut BTreeMap<u64, Option<Done>>, recorded_below: u64) -> Round {
    let mut last = None;
    for (tag, slot) in open.iter() {
        match slot {
            Some(d) if d.how == Settle::Ack && *tag < recorded_below => last = Some(*tag),
            _ => break,
        }
    }
    let run = last.map(|last| {
        let rest = match last.checked_add(1) {
            Some(above) => open.split_off(&above),
            None => BTreeMap::new(),
        };
        let taken = std::mem::replace(open, rest);
        let waiters = taken.into_values().flatten().map(|d| d.waiter).collect();
        (last, waiters)
    });
    let finished: Vec<u64> = open
        .iter()
        .filter(|(_, slot)| slot.is_some())
        .map(|(tag, _)| *tag)
        .collect();
    let singles = finished
        .into_iter()
        .filter_map(|tag| open.remove(&tag).flatten().map(|d| (tag, d)))
        .collect();
    Round { run, singles }
}

fn gone() -> BrokerError {
    BrokerError::ConnectionLost(
        "amqp: the delivery's channel is closed; the broker has requeued the message".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(slots: &[(u64, Option<Settle>)]) -> BTreeMap<u64, Option<Done>> {
        slots
            .iter()
            .map(|&(tag, how)| {
                let done = how.map(|how| Done {
                    how,
                    waiter: oneshot::channel().0,
                });
                (tag, done)
            })
            .collect()
    }

    /// The run as (highest tag, how many), and the single frames.
    type Shape = (Option<(u64, usize)>, Vec<(u64, Settle)>);

    fn shape(round: &Round) -> Shape {
        (
            round.run.as_ref().map(|(tag, w)| (*tag, w.len())),
            round.singles.iter().map(|(t, d)| (*t, d.how)).collect(),
        )
    }

    const ACK: Option<Settle> = Some(Settle::Ack);
    const REQUEUE: Option<Settle> = Some(Settle::Reject { requeue: true });

    #[test]
    fn leading_acks_go_as_one_run_the_rest_one_by_one() {
        let mut o = open(&[(1, ACK), (2, ACK), (3, None), (4, ACK), (5, REQUEUE)]);
        let round = take_round(&mut o, 6);
        assert_eq!(
            shape(&round),
            (
                Some((2, 2)),
                vec![(4, Settle::Ack), (5, Settle::Reject { requeue: true })]
            )
        );
        assert_eq!(o.keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_reject_ends_the_run() {
        let mut o = open(&[(7, ACK), (8, REQUEUE), (9, ACK)]);
        let round = take_round(&mut o, 10);
        assert_eq!(
            shape(&round),
            (
                Some((7, 1)),
                vec![(8, Settle::Reject { requeue: true }), (9, Settle::Ack)]
            )
        );
        assert!(o.is_empty());
    }

    #[test]
    fn the_run_never_covers_a_tag_not_recorded_yet() {
        // Tag 1 is still in another queue's stream: 2 and 3 must not be acked with `multiple`.
        let mut o = open(&[(2, ACK), (3, ACK)]);
        let round = take_round(&mut o, 1);
        assert_eq!(
            shape(&round),
            (None, vec![(2, Settle::Ack), (3, Settle::Ack)])
        );
        // Recorded up to 4: the run stops before tag 4.
        let mut o = open(&[(3, ACK), (4, ACK)]);
        let round = take_round(&mut o, 4);
        assert_eq!(shape(&round), (Some((3, 1)), vec![(4, Settle::Ack)]));
    }

    #[test]
    fn nothing_finished_is_an_empty_round() {
        let mut o = open(&[(1, None), (2, None)]);
        let round = take_round(&mut o, 3);
        assert_eq!(shape(&round), (None, vec![]));
        assert_eq!(o.len(), 2);
    }
}
