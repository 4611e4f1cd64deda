//! Writes seed inputs for the decoder fuzz targets (`fuzz/`): one valid
//! message of every kind of the vocabulary, for the modules the targets
//! serve (WordCount, BankTransfer), so the fuzzer starts from messages
//! that pass validation and explores their fields instead of garbage the
//! archive check refuses at once.
//!
//!     cargo run -p rama-net --example fuzz_seeds -- fuzz/seeds
//!
//! `fuzz/smoke.sh` runs it before fuzzing and passes `fuzz/seeds/<target>`
//! to libFuzzer as a second corpus directory.

use std::path::Path;

use engine::cluster::AckLevel;
use engine::pstate::Nav;
use engine::value::{archived, Value};
use engine::wire::{ClientRequest, ControlOp, Flow, PeerMessage};
use net::admin::{AdminRequest, DeployArgs};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".to_string());
    let dir = Path::new(&dir);
    let module = |m: &str| m.to_string();
    let sentence = archived::to_bytes(&Value::from("the cat the dog"));
    let deposit = archived::to_bytes(&Value::map([("account", Value::from("a")), ("amount", Value::Int(5))]));
    let requests = [
        (
            "append",
            ClientRequest::Append {
                module: module("WordCountModule"),
                depot: "*sentences".into(),
                record: sentence.clone(),
                ack: AckLevel::Ack,
            },
        ),
        (
            "append_hashed",
            ClientRequest::Append {
                module: module("BankTransferModule"),
                depot: "*deposits".into(),
                record: deposit.clone(),
                ack: AckLevel::AppendAck,
            },
        ),
        (
            "read",
            ClientRequest::Read {
                module: module("WordCountModule"),
                depot: "*sentences".into(),
                task: 0,
                start: 0,
                end: 10,
                bytes_max: 1 << 16,
            },
        ),
        (
            "select",
            ClientRequest::Select {
                module: module("WordCountModule"),
                pstate: "$$wordCounts".into(),
                path: vec![Nav::key("the")],
                task: None,
            },
        ),
        (
            "select_range",
            ClientRequest::Select {
                module: module("BankTransferModule"),
                pstate: "$$rejectedTransfers".into(),
                path: vec![Nav::key("a"), Nav::last(3)],
                task: Some(1),
            },
        ),
        (
            "invoke",
            ClientRequest::Invoke {
                module: module("WordCountModule"),
                query: "topWords".into(),
                args: archived::to_bytes(&Value::Int(3)),
            },
        ),
        (
            "tasks",
            ClientRequest::Tasks {
                module: module("BankTransferModule"),
            },
        ),
    ];
    for (name, r) in &requests {
        write(dir, "wire_request", name, &archived::encode(r))?;
    }
    // Peer messages: byte 0 is the lane (the target takes it mod 8).
    let peer: [(&str, u8, PeerMessage); 9] = [
        ("ping", 0, PeerMessage::Ping),
        (
            "append",
            1,
            PeerMessage::Append {
                depot: 0,
                task: 1,
                record: deposit,
                ack: AckLevel::Ack,
                wants_reply: true,
            },
        ),
        (
            "read",
            0,
            PeerMessage::Read {
                depot: 1,
                task: 2,
                start: 0,
                end: 5,
                bytes_max: 4096,
            },
        ),
        (
            "select",
            0,
            PeerMessage::Select {
                pstate: 0,
                task: 3,
                path: vec![Nav::key("a")],
            },
        ),
        (
            "invoke",
            0,
            PeerMessage::Invoke {
                query: 0,
                task: 0,
                args: archived::to_bytes(&Value::Nil),
            },
        ),
        (
            "ends",
            2,
            PeerMessage::Control {
                thread: 0,
                op: ControlOp::Ends { topology: 0 },
            },
        ),
        (
            "process",
            2,
            PeerMessage::Control {
                thread: 0,
                op: ControlOp::Process {
                    topology: 0,
                    id: 1,
                    attempt: 0,
                    ranges: vec![(0, 0, 0, 0)],
                },
            },
        ),
        (
            "abort",
            2,
            PeerMessage::Control {
                thread: 0,
                op: ControlOp::Abort { topology: 0, id: 1 },
            },
        ),
        (
            "stage",
            3,
            PeerMessage::Stage {
                flow: Flow::Query(0),
                stage: 1,
                task: 0,
                items: archived::encode(&vec![(0u64, Value::Int(1))]),
            },
        ),
    ];
    for (name, lane, m) in &peer {
        let mut bytes = vec![*lane];
        bytes.extend(archived::encode(m));
        write(dir, "peer_message", name, &bytes)?;
    }
    let deploy = DeployArgs {
        module: module("WordCountModule"),
        artifact: "ab".repeat(32),
        tasks: 4,
        threads: 2,
        workers: 1,
        replication_factor: 1,
        config_overrides: Some("{}".into()),
    };
    let admin = [
        ("upload_start", AdminRequest::UploadStart { size: 100 }),
        (
            "upload_chunk",
            AdminRequest::UploadChunk {
                upload: 1,
                offset: 0,
                data: vec![1, 2, 3],
            },
        ),
        ("deploy_check", AdminRequest::DeployCheck(deploy.clone())),
        ("deploy", AdminRequest::Deploy(deploy)),
        (
            "task_groups",
            AdminRequest::TaskGroups {
                module: module("M"),
                instance: Some(0),
            },
        ),
        (
            "workers",
            AdminRequest::Workers {
                module: module("M"),
                append: true,
            },
        ),
    ];
    for (name, r) in &admin {
        write(dir, "admin_request", name, &r.encode())?;
    }
    println!(
        "fuzz seeds: {} wire_request, {} peer_message, {} admin_request in {}",
        requests.len(),
        peer.len(),
        admin.len(),
        dir.display()
    );
    Ok(())
}
