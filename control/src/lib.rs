//! The control side of a cluster: configuration (`rama.yaml`) and the
//! development ZooKeeper. The Conductor, Supervisors and the metastore
//! (issue 4) build on these.

pub mod config;
pub mod devzk;
