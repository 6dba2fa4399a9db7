//! `soak`: a long run of Celerity worker pools at a steady, moderate load, printing the RSS and open
//! file descriptors of every process over time and, at the end, their slopes over the second half.
//! Exits 1 if a job was lost, a result was wrong or a pool died; 130 when stopped by Ctrl-C (after
//! cleaning up); 2 on bad arguments. See bench/README.md "Soak".

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use celerity_bench::procs;
use celerity_bench::setup::BrokerKind;
use celerity_bench::soak::{self, Config};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Brokers {
    Redis,
    Amqp,
    Both,
}

/// RSS and open fds of Celerity worker pools under a steady load, over a long run.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Args {
    /// Length of the run in minutes (the drain comes after)
    #[arg(long, default_value_t = 60.0, value_parser = positive)]
    minutes: f64,
    /// Seconds between samples
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    interval: u64,
    /// Which pools: Redis broker + Redis results, RabbitMQ broker + Redis results, or both
    #[arg(long, value_enum, default_value_t = Brokers::Both)]
    broker: Brokers,
    /// Jobs per second sent to each pool
    #[arg(long, default_value_t = 200.0, value_parser = positive)]
    rate: f64,
    /// Jobs at once per worker process (`celerity worker -P 2 -c N`)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: u64,
    /// Seconds without a new result after which the final drain gives up (what is missing then is lost)
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    drain_stall: u64,
    /// The celerity binary (default: target/release/celerity of this workspace)
    #[arg(long)]
    celerity_bin: Option<PathBuf>,
}

/// A finite number above 0 and at most a year's worth (minutes) / a million (jobs/s).
fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 && v <= 1e6 {
        Ok(v)
    } else {
        Err("expected a number above 0 and at most 1000000".into())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let celerity = match procs::celerity_binary(args.celerity_bin.as_deref()) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let config = Config {
        celerity,
        brokers: match args.broker {
            Brokers::Redis => vec![BrokerKind::Redis],
            Brokers::Amqp => vec![BrokerKind::Amqp],
            Brokers::Both => vec![BrokerKind::Redis, BrokerKind::Amqp],
        },
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        interval: Duration::from_secs(args.interval),
        rate: args.rate,
        concurrency: args.concurrency as usize,
        drain_stall: Duration::from_secs(args.drain_stall),
    };

    // First SIGINT/SIGTERM: stop sending, drain, clean up. Second: skip the rest of the drain.
    let (stop_tx, stop) = watch::channel(false);
    let (hurry_tx, hurry) = watch::channel(false);
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("soak: cannot listen for signals");
        std::process::exit(1);
    };
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                eprintln!("soak: stopping: draining and cleaning up (again to skip the drain)");
                let _ = stop_tx.send(true);
            } else {
                eprintln!("soak: skipping the drain; cleaning up");
                let _ = hurry_tx.send(true);
            }
        }
    });

    match soak::run(&config, stop, hurry).await {
        Ok(outcome) => {
            let lost: u64 = outcome.stats.iter().map(|(_, s)| s.lost).sum();
            let wrong: u64 = outcome.stats.iter().map(|(_, s)| s.wrong).sum();
            if outcome.passed() && outcome.interrupted {
                println!("soak: stopped early: 0 lost, 0 wrong so far");
            } else if outcome.passed() {
                println!("soak: passed: 0 lost, 0 wrong");
            } else {
                println!(
                    "soak: FAILED: {lost} lost, {wrong} wrong{}",
                    if outcome.pool_died {
                        ", a pool's supervisor exited"
                    } else {
                        ""
                    }
                );
            }
            if !outcome.passed() {
                std::process::exit(1);
            }
            if outcome.interrupted {
                std::process::exit(130);
            }
        }
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    }
}
