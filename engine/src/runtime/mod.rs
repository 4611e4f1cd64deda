//! Where tasks run: the placement of a module's tasks on task threads and
//! of task threads on workers (`placement`), and the pinned hash that
//! picks a key's task (`partition`). The task threads themselves, their
//! channels and storage are `cluster`'s (one path: an earlier glommio
//! channel mesh here was never used by the cluster and is gone).

pub mod partition;
pub mod placement;
