//! Transactions on one hash slot while that slot moves to another master (a reshard).
//!
//! The redis crate follows `MOVED` and `ASK` for a single command, but a pipeline is not safe to
//! send again as a whole: while a slot migrates, the commands of one pipeline can land half on the
//! old master and half on the new one (the key moved between two of them), and sending it again
//! stores the first half twice. So the writes that need several commands on one queue (a publish
//! batch, a dead-letter push and trim, a purge) go as one `MULTI`/`EXEC` here: it runs whole or not
//! at all. When the slot is migrating and the key already left, its commands are answered `ASK`
//! and the transaction is aborted; a transaction on that one key is then sent to the node `ASK`
//! names, after `ASKING` (which holds for a whole transaction). A transaction on several keys is
//! not: some of them may still be on the old master, and the new one would start them afresh
//! beside the old ones; it waits for the slot to finish moving instead. `MOVED`, `TRYAGAIN` and
//! `CLUSTERDOWN` make it wait a little and go again after a single command on the key has
//! refreshed the client's slot map.

use std::time::Duration;

use redis::{ErrorKind, Pipeline, RedisError, RedisResult, ServerErrorKind, Value};

use super::conn::ClusterRedial;

/// How many times a transaction is tried while its slot moves (about 5 s with [`PAUSE`]).
const ATTEMPTS: u32 = 100;
/// The pause between two tries.
const PAUSE: Duration = Duration::from_millis(50);

/// What an error says about where the slot is.
#[derive(Debug, PartialEq)]
enum Redirect {
    /// Migrating: the key is on this node (`ASK`).
    Ask { host: String, port: u16 },
    /// Moved, being moved, or the cluster is failing over: try again shortly.
    Again,
}

/// Runs `pipe` as one transaction on the master of the slot of `keys` (every key `pipe` touches;
/// all in one slot), following the slot while it moves; see the module doc.
pub(crate) async fn transaction(
    conn: &ClusterRedial,
    keys: &[String],
    pipe: &Pipeline,
) -> RedisResult<Value> {
    let Some(key) = keys.first() else {
        return Ok(Value::Nil);
    };
    let one_key = keys.iter().all(|k| k == key);
    let mut atomic = pipe.clone();
    atomic.atomic();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match atomic.query_async::<Value>(&mut conn.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Some(redirect) = redirect_of(&error) else {
            return Err(error);
        };
        if attempt >= ATTEMPTS {
            return Err(error);
        }
        if let (Redirect::Ask { host, port }, true) = (redirect, one_key) {
            match asking(conn, pipe, host, port).await {
                Ok(v) => return Ok(v),
                Err(e) if is_aborted(&e) || redirect_of(&e).is_some() => {}
                Err(e) => return Err(e),
            }
        } else {
            // A single command follows MOVED itself and refreshes the slot map for the next try.
            let _: RedisResult<i64> = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn.clone())
                .await;
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// `ASKING`, then `pipe` as one transaction, on the node at `host:port`: the reply of `EXEC`.
async fn asking(
    conn: &ClusterRedial,
    pipe: &Pipeline,
    host: String,
    port: u16,
) -> RedisResult<Value> {
    let mut asking = redis::pipe();
    asking.cmd("ASKING").cmd("MULTI");
    let mut n = 0;
    for cmd in pipe.cmd_iter() {
        asking.add_command(cmd.clone());
        n += 1;
    }
    asking.cmd("EXEC");
    let mut replies = conn.route_pipeline(asking, n + 2, 1, host, port).await?;
    replies
        .pop()
        .ok_or_else(|| RedisError::from((ErrorKind::Parse, "no reply to EXEC after ASKING")))
}

fn is_aborted(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ExecAbort)
}

/// The redirection among `error`'s server errors (a transaction's are those of its commands).
fn redirect_of(error: &RedisError) -> Option<Redirect> {
    let errors = error.clone().into_server_errors()?;
    let mut again = false;
    for (_, e) in errors.iter() {
        match e.kind() {
            Some(ServerErrorKind::Ask) => {
                if let Some(ask) = e.details().and_then(parse_ask) {
                    return Some(ask);
                }
                again = true;
            }
            Some(
                ServerErrorKind::Moved
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown,
            ) => again = true,
            _ => {}
        }
    }
    again.then_some(Redirect::Again)
}

/// `<slot> <host>:<port>` of an `ASK` error.
fn parse_ask(details: &str) -> Option<Redirect> {
    let addr = details.split_ascii_whitespace().nth(1)?;
    let (host, port) = addr.rsplit_once(':')?;
    Some(Redirect::Ask {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: port.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ask_names_its_node() {
        assert_eq!(
            parse_ask("4741 127.0.0.1:17131"),
            Some(Redirect::Ask {
                host: "127.0.0.1".into(),
                port: 17131
            })
        );
        assert_eq!(
            parse_ask("1 [::1]:7000"),
            Some(Redirect::Ask {
                host: "::1".into(),
                port: 7000
            })
        );
        assert_eq!(parse_ask("4741"), None);
        assert_eq!(parse_ask("4741 host:notaport"), None);
    }
}
