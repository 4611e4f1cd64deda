//! Fuzzes the wire request decoder of workers (`net::wire`): arbitrary
//! frame payloads served against a live cluster. Every input must get an
//! answer that decodes (an error map for garbage), never a panic, a hang
//! or unbounded recursion.
//!
//! Run: `fuzz/smoke.sh 30 wire_request`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use engine::value::archived;

fuzz_target!(|data: &[u8]| {
    let answer = net::wire::handle(&common::CLUSTER, data);
    archived::from_bytes(&answer).expect("every answer decodes");
});
