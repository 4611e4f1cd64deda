//! Everything that crosses the network: the framed transport
//! ([`transport`]), the messages of the module API ([`wire`]), remote
//! clients ([`remote`], found through the metastore by [`manager`]), and
//! the module artifact's `main` ([`artifact`],
//! [`module_main!`]), which runs a module as a worker serving the wire
//! protocol and, for a module spread over workers, the messages between
//! them ([`peers`]).

pub mod admin;
pub mod artifact;
pub mod auth;
pub mod manager;
pub mod peers;
pub mod remote;
pub mod transport;
pub mod wire;

pub use engine;
pub use transport::*;

// One nesting limit for every decoder: archives (engine) and YAML (control).
const _: () = assert!(engine::value::DEPTH_MAX == control::yaml::DEPTH_MAX);
