//! Links the release `celerity` binary as a position-dependent executable on Linux.
//!
//! A position-independent executable must have its ~1 MB of `.data.rel.ro` (vtables, tables of
//! string slices) relocated by the dynamic loader at every start: ~39,000 relocations read from
//! `.rela.dyn`, and every page of `.data.rel.ro` written, so private, in each process of a worker
//! pool. Linked at a fixed address there is nothing to relocate and those pages stay shared and
//! untouched until used. The cost is that the executable's own image is not placed at a random
//! address (libraries, heap and stacks still are), as with Go's default builds. Set
//! `CELERITY_PIE=1` when building to keep a PIE.

fn main() {
    println!("cargo:rerun-if-env-changed=CELERITY_PIE");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let keep_pie = std::env::var_os("CELERITY_PIE").is_some_and(|v| v != "0");
    if release && linux && !keep_pie {
        println!("cargo:rustc-link-arg-bin=celerity=-no-pie");
    }
}
