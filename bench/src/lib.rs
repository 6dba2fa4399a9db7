//! The benchmark and soak harness's shared parts: which setup runs (`setup`), starting and
//! watching worker processes (`procs`), looking at the broker and results from outside (`probe`),
//! the job shapes (`shapes`), the add row on the `rpc://` backend (`rpcrow`), the raw broker rows
//! (`rawredis`, `rawamqp`) and each row's place against them (`ceiling`), BullMQ as a peer
//! (`bullmq`), the SVG pictures (`charts`), how cost grows (`growth`, `backlog`), the table
//! (`report`) and
//! the long-run `soak` command's load and sampling (`soak`). The `bench` binary is `main.rs`; the
//! `soak` binary is `bin/soak.rs`.

pub mod backlog;
pub mod bullmq;
pub mod ceiling;
pub mod charts;
pub mod error;
pub mod growth;
pub mod probe;
pub mod procs;
pub mod rawamqp;
pub mod rawredis;
pub mod report;
pub mod rpcrow;
pub mod setup;
pub mod shapes;
pub mod soak;
