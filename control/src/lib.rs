//! The control side of a cluster: configuration (`rama.yaml`, and
//! `logging.yaml` beside it), the
//! development ZooKeeper, and the metastore (a trait with a ZooKeeper
//! backend). The Conductor and Supervisors (issue 4) build on these.

pub mod config;
pub mod devzk;
pub mod layout;
pub mod logging;
pub mod metastore;
pub mod process;
pub mod worker_config;
pub mod yaml;
