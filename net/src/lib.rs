//! Everything that crosses the network: the framed transport
//! ([`transport`]) and its authentication ([`auth`]), the messages of the
//! module API ([`wire`]) and their JSON forms ([`json`]), remote clients
//! ([`remote`], found through the metastore by [`manager`]), the
//! Conductor's admin client ([`admin`]), and the messages between the
//! workers of a module ([`peers`]). The processes that serve them (the
//! Conductor, Supervisors, the worker host) are in the `daemons` crate.

pub mod admin;
pub mod auth;
pub mod json;
pub mod manager;
pub mod peers;
pub mod remote;
pub mod transport;
pub mod wire;

pub use engine;
pub use transport::*;

// One nesting limit for every decoder: archives (engine) and YAML (control).
const _: () = assert!(engine::value::DEPTH_MAX == control::yaml::DEPTH_MAX);
