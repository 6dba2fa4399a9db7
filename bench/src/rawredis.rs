//! The raw limit of the local Redis: `redis-benchmark` LPUSH/RPOP, without and with 16-deep
//! pipelining, on a database the workers do not use (its keys are deleted afterwards), and the
//! round-trip floor of a job's hops through Redis with nothing else around them.

use futures_util::StreamExt as _;
use tokio::process::Command;

use crate::error::{BenchError, Result};

/// The Redis database redis-benchmark writes to.
const DB: &str = "9";

/// (LPUSH ops/s, RPOP ops/s) for `requests` requests with pipeline depth `pipeline`.
pub async fn lpush_rpop(requests: usize, pipeline: usize) -> Result<(f64, f64)> {
    lpush_rpop_sized(requests, pipeline, 3).await
}

/// [`lpush_rpop`] with values of `bytes` bytes (redis-benchmark's `-d`; its default is 3).
pub async fn lpush_rpop_sized(
    requests: usize,
    pipeline: usize,
    bytes: usize,
) -> Result<(f64, f64)> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "--dbnum",
            DB,
            "-q",
            "-t",
            "lpush,rpop",
        ])
        .arg("-n")
        .arg(requests.to_string())
        .arg("-P")
        .arg(pipeline.to_string())
        .arg("-d")
        .arg(bytes.max(1).to_string())
        .output()
        .await
        .map_err(|e| BenchError::Setup(format!("redis-benchmark: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines look like "LPUSH: 55000.00 requests per second, p50=0.4 msec" (progress lines end in \r).
    let find = |cmd: &str| {
        text.split(['\n', '\r'])
            .filter_map(|l| l.trim().strip_prefix(cmd)?.strip_prefix(':'))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .next_back()
    };
    let (Some(lpush), Some(rpop)) = (find("LPUSH"), find("RPOP")) else {
        return Err(BenchError::Setup(format!(
            "redis-benchmark printed no LPUSH/RPOP rates: {text}"
        )));
    };
    cleanup().await;
    Ok((lpush, rpop))
}

/// Deletes the list redis-benchmark filled.
async fn cleanup() {
    let url = format!("redis://127.0.0.1:6379/{DB}");
    if let Ok(client) = redis::Client::open(url) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("mylist*")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
            }
        }
    }
}

/// The floor of a round trip through Redis with the hops a job with a result makes, and no task
/// queue around them: one-way latencies in milliseconds, sorted. A relay on a thread (and runtime)
/// of its own stands in for the worker: `BLPOP` a list, `PUBLISH` what it popped. The caller
/// subscribes to the channel, then `calls` times: `LPUSH`, and wait for the message.
pub async fn relay_latency(calls: usize) -> Result<Vec<f64>> {
    let url = format!("redis://127.0.0.1:6379/{DB}");
    let client = redis::Client::open(url.as_str()).map_err(setup_err)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (list, channel) = (
        format!("bench-relay-{id}"),
        format!("bench-relay-{id}-done"),
    );
    let mut pubsub = client.get_async_pubsub().await.map_err(setup_err)?;
    pubsub.subscribe(&channel).await.map_err(setup_err)?;
    let relay = {
        let (client, list, channel) = (client.clone(), list.clone(), channel.clone());
        std::thread::spawn(move || -> redis::RedisResult<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut conn = client.get_multiplexed_async_connection().await?;
                for _ in 0..calls {
                    let (_, item): (String, String) = redis::cmd("BLPOP")
                        .arg(&list)
                        .arg(10)
                        .query_async(&mut conn)
                        .await?;
                    let _: i64 = redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(item)
                        .query_async(&mut conn)
                        .await?;
                }
                Ok(())
            })
        })
    };
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(setup_err)?;
    let mut messages = pubsub.on_message();
    let mut ms = Vec::with_capacity(calls);
    for i in 0..calls {
        let t = std::time::Instant::now();
        let _: i64 = redis::cmd("LPUSH")
            .arg(&list)
            .arg(i)
            .query_async(&mut conn)
            .await
            .map_err(setup_err)?;
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next()).await;
        if !matches!(got, Ok(Some(_))) {
            return Err(BenchError::Setup(
                "raw Redis relay: no message in time".into(),
            ));
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(messages);
    let _ = tokio::task::spawn_blocking(move || relay.join()).await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&list).query_async(&mut conn).await;
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

fn setup_err(e: redis::RedisError) -> BenchError {
    BenchError::Setup(format!("raw Redis: {e}"))
}
