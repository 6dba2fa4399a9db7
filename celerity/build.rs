//! Link options of the release `celerity` binary on Linux: a position-dependent executable, and its
//! worker's functions placed together.
//!
//! **No PIE.** A position-independent executable must have its ~1 MB of `.data.rel.ro` (vtables,
//! tables of string slices) relocated by the dynamic loader at every start: ~39,000 relocations
//! read from `.rela.dyn`, and every page of `.data.rel.ro` written, so private, in each process of
//! a worker pool. Linked at a fixed address there is nothing to relocate and those pages stay
//! shared and untouched until used. The cost is that the executable's own image is not placed at
//! a random address (libraries, heap and stacks still are), as with Go's default builds. Set
//! `CELERITY_PIE=1` when building to keep a PIE.
//!
//! **Symbol order.** The kernel maps an executable's code 64 KiB at a time around each page first
//! run, and what a worker runs is spread over all of `.text`; `symbol-order.txt`
//! (`scripts/symbol-order` writes it) lists those functions so that LLD puts them first, together.
//! Only with LLD, which rustc ≥ 1.90 uses by default on x86_64 Linux, and only when no other linker
//! is configured; `CELERITY_SYMBOL_ORDER=0` turns it off. Names the binary does not have are
//! skipped, so a stale list costs memory, not correctness.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CELERITY_PIE");
    println!("cargo:rerun-if-env-changed=CELERITY_SYMBOL_ORDER");
    println!("cargo:rerun-if-changed=symbol-order.txt");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if !release || !linux {
        return;
    }
    let keep_pie = std::env::var_os("CELERITY_PIE").is_some_and(|v| v != "0");
    if !keep_pie {
        println!("cargo:rustc-link-arg-bin=celerity=-no-pie");
    }
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    if order.is_file() && links_with_lld() {
        println!(
            "cargo:rustc-link-arg-bin=celerity=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
            order.display()
        );
    }
}

/// Whether this build links with rustc's own LLD: x86_64 Linux (GNU), rustc 1.90 or later, no
/// linker chosen in Cargo's config or RUSTFLAGS, and `CELERITY_SYMBOL_ORDER` not `0`.
fn links_with_lld() -> bool {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CELERITY_SYMBOL_ORDER") == "0"
        || var("CARGO_CFG_TARGET_ARCH") != "x86_64"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
        || std::env::var_os("RUSTC_LINKER").is_some()
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link")
    {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
