//! The processes of a cluster: the Conductor ([`conductor`]: admin API,
//! artifact store, module lifecycle, scheduler), the Supervisor
//! ([`supervisor`]: runs the workers assigned to its machine), and the
//! worker host ([`worker`]: a module artifact's `main`, built with
//! [`module_main!`], running a module's task threads and serving clients
//! and peers). The `rama` command line starts them; what they share with
//! clients (configuration, metadata layout, transport) lives in `control`
//! and `net`. The planned replication coordinator and the Cluster UI
//! server belong to the Conductor here.

pub mod conductor;
pub mod replication;
pub mod supervisor;
pub mod worker;

pub use engine;
