//! The raw limit of the local Redis: `redis-benchmark` LPUSH/RPOP, without and with 16-deep
//! pipelining, on a database the workers do not use (its keys are deleted afterwards).

use tokio::process::Command;

use crate::error::{BenchError, Result};

/// The Redis database redis-benchmark writes to.
const DB: &str = "9";

/// (LPUSH ops/s, RPOP ops/s) for `requests` requests with pipeline depth `pipeline`.
pub async fn lpush_rpop(requests: usize, pipeline: usize) -> Result<(f64, f64)> {
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
