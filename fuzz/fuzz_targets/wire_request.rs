//! Fuzzes the wire request decoder of workers (`net::wire`): arbitrary
//! frame payloads served against a live cluster. Every input must get an
//! answer that decodes (a `WireError` for garbage), never a panic, a hang
//! or unbounded recursion.
//!
//! Run: `fuzz/smoke.sh 30 wire_request`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let answer = net::wire::handle(&common::CLUSTER, data);
    engine::wire::decode_answer(&answer).expect("every answer decodes");
});
