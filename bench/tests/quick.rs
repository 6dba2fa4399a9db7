//! The whole benchmark matrix in `--quick` mode (tiny job counts, one run) against the real Redis and
//! RabbitMQ and real Python Celery, with the debug `celerity` binary: checks that the harness works
//! end to end and prints a complete table. The numbers are not checked (speed belongs to the
//! benchmark itself). Set `CELERITY_NO_PYTHON=1` to run the Celerity side only. BullMQ runs too when
//! `node` and `npm` are on PATH (its pinned install under target/bullmq takes a few seconds once);
//! `CELERITY_NO_NODE=1` leaves it out.

use std::path::PathBuf;
use std::process::Command;

/// The workspace's debug `celerity` binary, built if missing (it is another package's binary).
fn celerity_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("target/debug/celerity");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "celerity", "--bin", "celerity"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the celerity binary failed");
    }
    bin
}

/// Whether `tool --version` runs.
fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn quick_matrix_runs_end_to_end() {
    let no_python = std::env::var_os("CELERITY_NO_PYTHON").is_some();
    let bullmq =
        std::env::var_os("CELERITY_NO_NODE").is_none() && on_path("node") && on_path("npm");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bench"));
    cmd.arg("--quick").arg("--celerity-bin").arg(celerity_bin());
    if no_python {
        eprintln!("CELERITY_NO_PYTHON is set: benchmarking the Celerity side only");
        cmd.args(["--only", "celerity"]);
    }
    if !bullmq {
        eprintln!("CELERITY_NO_NODE is set or node/npm are missing: no BullMQ rows");
        cmd.arg("--skip-bullmq");
    }
    let out = cmd.output().expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --quick failed\n{stderr}\n{stdout}"
    );
    println!("{stdout}");

    // Every shape on every setup produced a row, each with a number for the systems that ran.
    let expected = [
        ("noop ×300", "Redis / none", "drain jobs/s"),
        ("noop ×300", "RabbitMQ / none", "enqueue msgs/s"),
        ("add ×300, results checked", "Redis / Redis", "drain jobs/s"),
        (
            "add ×300, results checked",
            "RabbitMQ / Redis",
            "drain jobs/s",
        ),
        ("round trip, 20 sequential add", "Redis / Redis", "p50 ms"),
        (
            "round trip, 20 sequential add",
            "RabbitMQ / Redis",
            "p99 ms",
        ),
        (
            "memory (RSS, worker + children)",
            "Redis / Redis",
            "idle MiB",
        ),
        ("sleep_ms(100) IO-bound", "Redis / Redis", "jobs/s"),
    ];
    for (shape, setup, metric) in expected {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {shape} | {setup} | {metric}")))
            .unwrap_or_else(|| panic!("no row {shape} / {setup} / {metric} in\n{stdout}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | shape | setup | metric | Celery | Celerity | ratio |
        let celerity = cells[5];
        assert!(
            celerity.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "no Celerity number in {line}"
        );
        if !no_python {
            assert!(
                cells[4].chars().next().is_some_and(|c| c.is_ascii_digit()),
                "no Celery number in {line}"
            );
            assert!(cells[6].ends_with('×'), "no ratio in {line}");
        }
    }
    // | shape | setup | metric | Celery | Celerity | ÷ | BullMQ | ÷ BullMQ | broker alone | ÷ it |
    let cells_of = |shape: &str, setup: &str, metric: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {shape} | {setup} | {metric}")))
            .unwrap_or_else(|| panic!("no row {shape} / {setup} / {metric} in\n{stdout}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    let digit = |c: &str| c.chars().next().is_some_and(|c| c.is_ascii_digit());
    // Each Celerity throughput and latency row has its fraction of the broker alone.
    for (shape, setup, metric) in [
        ("add ×300, results checked", "Redis / Redis", "drain jobs/s"),
        (
            "add ×300, results checked",
            "RabbitMQ / Redis",
            "drain jobs/s",
        ),
        ("round trip, 20 sequential add", "Redis / Redis", "p50 ms"),
        (
            "round trip, 20 sequential add",
            "RabbitMQ / Redis",
            "p50 ms",
        ),
        (
            "add ×300, results checked, default worker flags",
            "Redis / Redis",
            "drain jobs/s",
        ),
    ] {
        let cells = cells_of(shape, setup, metric);
        assert!(digit(&cells[5]), "no Celerity number in {cells:?}");
        assert!(
            digit(&cells[9]) && digit(&cells[10]),
            "no ceiling in {cells:?}"
        );
    }
    if bullmq {
        for (shape, metric) in [
            ("add ×300, results checked", "drain jobs/s"),
            ("round trip, 20 sequential add", "p99 ms"),
            ("memory (RSS, worker + children)", "idle MiB"),
        ] {
            let cells = cells_of(shape, "Redis / Redis", metric);
            assert!(digit(&cells[7]), "no BullMQ number in {cells:?}");
            assert!(cells[8].ends_with('×'), "no Celerity ÷ BullMQ in {cells:?}");
        }
    }
    assert!(stdout.contains("| -P 16 |"), "no raw redis-benchmark rows");
    let raw_amqp = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Raw RabbitMQ"))
        .find(|l| l.starts_with("| ") && l.as_bytes().get(2).is_some_and(u8::is_ascii_digit))
        .unwrap_or_else(|| panic!("no raw RabbitMQ row in\n{stdout}"));
    assert_eq!(
        raw_amqp.split('|').count(),
        7,
        "five raw RabbitMQ numbers: {raw_amqp}"
    );
    // How cost grows, on both brokers: each table has a row per broker with a number in it.
    for broker in ["Redis", "RabbitMQ"] {
        for point in ["-P 4", "1 MB", "100"] {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&format!("| {broker} | {point} |")))
                .unwrap_or_else(|| panic!("no growth row {broker} / {point} in\n{stdout}"));
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            assert!(digit(cells[3]), "no number in {line}");
        }
    }
    // The backlog on both brokers, with Celerity's bytes per job at both sample sizes.
    for broker in ["Redis", "RabbitMQ"] {
        let line = stdout
            .lines()
            .skip_while(|l| !l.starts_with("Backlog"))
            .find(|l| l.starts_with(&format!("| {broker} |")))
            .unwrap_or_else(|| panic!("no backlog row {broker} in\n{stdout}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(
            digit(cells[2]) && digit(cells[3]),
            "no bytes per job in {line}"
        );
    }
}
