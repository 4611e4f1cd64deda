//! A live in-process cluster shared by the network-decoder targets: the
//! example WordCount and BankTransfer modules on their own task threads,
//! data in a temporary directory (left to the OS: the process ends with
//! the run).

use std::sync::{Arc, LazyLock};

use engine::cluster::InProcessCluster;
use engine::module::Module;

pub static CLUSTER: LazyLock<Arc<InProcessCluster>> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("rama-fuzz-{}", std::process::id()));
    let mut cluster = InProcessCluster::new(&dir);
    cluster
        .launch(rama_examples::WordCountModule::define().expect("WordCount defines"), 4, 1)
        .expect("WordCount launches");
    cluster
        .launch(rama_examples::BankTransferModule::define().expect("Bank defines"), 4, 1)
        .expect("BankTransfer launches");
    Arc::new(cluster)
});
