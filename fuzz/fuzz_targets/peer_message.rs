//! Fuzzes the decoder of messages between workers (`engine::cluster::peer`):
//! byte 0 picks the lane, the rest is the message, served against a live
//! cluster (BankTransfer: stream, microbatch and query lanes). Every input
//! must get an answer, never a panic (a short stage message once indexed
//! `&p[1..5]`; an index from the network once indexed the module's
//! objects unchecked).
//!
//! Messages that close the read gate are skipped: they hold reads back
//! for their lease by design (bounded, but a fuzz run would mostly wait).
//!
//! Run: `fuzz/smoke.sh 30 peer_message`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use engine::value::archived;
use engine::wire::{ArchivedControlOp, ArchivedPeerMessage};

fuzz_target!(|data: &[u8]| {
    let Some((&lane, message)) = data.split_first() else {
        return;
    };
    if let Ok(ArchivedPeerMessage::Control {
        op: ArchivedControlOp::GateClose { .. },
        ..
    }) = archived::access_as::<ArchivedPeerMessage>(message)
    {
        return;
    }
    let answer = common::CLUSTER.serve_peer("BankTransferModule", u32::from(lane % 8), message);
    let answer = futures_lite::future::block_on(answer);
    engine::wire::decode_answer(&answer).expect("every answer decodes");
});
