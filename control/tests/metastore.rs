//! The ZooKeeper metastore against a real ZooKeeper (Debian's package,
//! started on loopback by `DevZookeeper`): data and versions, ephemeral
//! nodes, watches, a ZooKeeper restart, and an unreachable server.

use std::path::Path;
use std::time::{Duration, Instant};

use control::config::Config;
use control::devzk::DevZookeeper;
use control::metastore::{Credentials, MetaError, Metastore, NodeKind, ZkMetastore};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn zookeeper(dir: &Path, port: u16) -> DevZookeeper {
    let text = format!("zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {port}\nlocal.dir: data\n");
    let config = Config::parse(&dir.join("rama.yaml"), &text).unwrap();
    DevZookeeper::start(&config).unwrap()
}

fn credentials(password: &str) -> Credentials {
    Credentials {
        user: "rama".into(),
        password: password.into(),
    }
}

fn connect(port: u16, root: &str) -> ZkMetastore {
    connect_as(port, root, "test-password").unwrap()
}

fn connect_as(port: u16, root: &str, password: &str) -> Result<ZkMetastore, control::metastore::MetaError> {
    ZkMetastore::connect(
        &["127.0.0.1".to_string()],
        port,
        root,
        &credentials(password),
        Duration::from_secs(30),
    )
}

/// Regression: every node was `world:anyone cdrwa`, so anyone reaching
/// ZooKeeper could rewrite the Conductor's address or a worker's
/// registration. Nodes are now the cluster's alone (digest ACLs).
#[test]
fn metadata_is_the_clusters_alone() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _zk = zookeeper(dir.path(), port);
    let meta = connect(port, "acl-test");
    meta.create_all("/modules").unwrap();
    meta.create("/conductor", b"127.0.0.1:1973", NodeKind::Ephemeral)
        .unwrap();
    assert_eq!(meta.owner("/conductor").unwrap(), Some(meta.session_id()));
    assert_eq!(meta.owner("/modules").unwrap(), Some(0));
    assert_eq!(meta.owner("/nothing").unwrap(), None);
    // Another cluster's credentials under the same root: refused at
    // connect, with the reason named.
    let err = connect_as(port, "acl-test", "another-secret").unwrap_err().to_string();
    assert!(err.contains("refuses this cluster's credentials"), "{err}");
    // Without any credentials (a plain ZooKeeper client), nothing can be
    // read or changed.
    smol::block_on(async {
        let anon = zookeeper_client::Client::connector()
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        assert!(
            anon.get_data("/acl-test/conductor").await.is_err(),
            "read without credentials"
        );
        assert!(anon.set_data("/acl-test/conductor", b"evil:1", None).await.is_err());
        assert!(anon.delete("/acl-test/conductor", None).await.is_err());
        let opts = zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
        assert!(anon.create("/acl-test/modules/evil", b"", &opts).await.is_err());
    });
    // The cluster's own session still reads its data.
    assert_eq!(meta.get("/conductor").unwrap().unwrap().0, b"127.0.0.1:1973");
}

#[test]
fn data_versions_children_ephemerals_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _zk = zookeeper(dir.path(), port);
    let meta = connect(port, "rama-test");

    meta.create_all("/modules/WordCount").unwrap();
    meta.create_all("/modules/WordCount").unwrap();
    meta.create("/modules/WordCount/state", b"launching", NodeKind::Persistent)
        .unwrap();
    assert_eq!(
        meta.create("/modules/WordCount/state", b"x", NodeKind::Persistent),
        Err(MetaError::NodeExists("/modules/WordCount/state".into()))
    );
    let (data, v0) = meta.get("/modules/WordCount/state").unwrap().unwrap();
    assert_eq!(data, b"launching");
    let v1 = meta.set("/modules/WordCount/state", b"running", Some(v0)).unwrap();
    assert_eq!(v1, v0 + 1);
    // A write based on a stale read is refused.
    assert!(matches!(
        meta.set("/modules/WordCount/state", b"stale", Some(v0)),
        Err(MetaError::BadVersion(_))
    ));
    assert_eq!(meta.get("/nope").unwrap(), None);
    assert!(matches!(meta.delete("/modules", None), Err(MetaError::NotEmpty(_))));

    // Ephemeral nodes live as long as their session.
    let (children, watch) = meta.watch_children("/modules").unwrap();
    assert_eq!(children, ["WordCount"]);
    let other = connect(port, "rama-test");
    other.create("/modules/alive", b"", NodeKind::Ephemeral).unwrap();
    assert!(watch.wait(Duration::from_secs(10)), "the child watch did not fire");
    assert_eq!(meta.children("/modules").unwrap(), ["WordCount", "alive"]);
    let (_, watch) = meta.watch_children("/modules").unwrap();
    drop(other);
    assert!(
        watch.wait(Duration::from_secs(30)),
        "the ephemeral node outlived its session"
    );
    assert_eq!(meta.children("/modules").unwrap(), ["WordCount"]);

    // The root is where the paths live; delete_all clears a subtree.
    let plain = connect(port, "/");
    assert!(plain.children("/").unwrap().contains(&"rama-test".to_string()));
    meta.delete_all("/modules").unwrap();
    meta.delete_all("/modules").unwrap();
    assert_eq!(meta.children("/").unwrap(), Vec::<String>::new());
}

#[test]
fn survives_a_zookeeper_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut zk = zookeeper(dir.path(), port);
    let meta = connect(port, "rama");
    meta.create("/kept", b"1", NodeKind::Persistent).unwrap();
    zk.stop();
    drop(zk);
    let _zk = zookeeper(dir.path(), port);
    // The client reconnects on its own (same session if within its timeout,
    // else a new one and SessionExpired once).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match meta.get("/kept") {
            Ok(got) => {
                assert_eq!(got.unwrap().0, b"1");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no reconnect after the restart: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    meta.set("/kept", b"2", None).unwrap();
}

#[test]
fn unreachable_zookeeper_is_a_clear_error() {
    let port = free_port();
    let start = Instant::now();
    let err = ZkMetastore::connect(
        &["127.0.0.1".to_string()],
        port,
        "rama",
        &credentials("p"),
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert!(start.elapsed() >= Duration::from_secs(1), "gave up without retrying");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("ZooKeeper unreachable at 127.0.0.1:{port}")),
        "{msg}"
    );
}
