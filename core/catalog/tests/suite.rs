//! The catalog suite, run on SQLite and on a throwaway PostgreSQL cluster started by the
//! test itself (initdb in a temp dir, its own port on loopback).

use std::path::PathBuf;
use std::process::Command;

use osstream_catalog::{
    BootMethod, Catalog, Client, ClientChanges, Mac, SqlCatalog, UnknownClientPolicy, Vdisk,
    VdiskChanges, VdiskMode, WriteCache,
};
use osstream_core::ErrorKind;

fn vdisk(name: &str, mode: VdiskMode) -> Vdisk {
    Vdisk {
        name: name.into(),
        backend: "images".into(),
        key: name.into(),
        size: 64 << 20,
        mode,
        write_cache: WriteCache::Ram,
        boot: BootMethod::LinuxNbd,
        kernel: None,
        initrd: None,
        cmdline: None,
        description: String::new(),
        enabled: true,
        locked_by: None,
        created_at: 0,
    }
}

fn client(mac: &str, name: Option<&str>) -> Client {
    Client {
        mac: mac.parse().unwrap(),
        name: name.map(str::to_owned),
        hostname: name.map(|n| format!("{n}-host")),
        group: Some("lab".into()),
        notes: String::new(),
        first_seen: None,
        last_seen: None,
        created_at: 0,
    }
}

async fn suite(catalog: &dyn Catalog) {
    // vdisks
    catalog
        .add_vdisk(&vdisk("win11", VdiskMode::Standard))
        .await
        .unwrap();
    catalog
        .add_vdisk(&vdisk("ubuntu", VdiskMode::Standard))
        .await
        .unwrap();
    catalog
        .add_vdisk(&vdisk("build", VdiskMode::Private))
        .await
        .unwrap();
    let err = catalog
        .add_vdisk(&vdisk("win11", VdiskMode::Standard))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = catalog
        .add_vdisk(&vdisk("../etc", VdiskMode::Standard))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let names: Vec<String> = catalog
        .vdisks()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["build", "ubuntu", "win11"]);
    let changed = catalog
        .update_vdisk(
            "ubuntu",
            &VdiskChanges {
                write_cache: Some(WriteCache::ServerDisk),
                description: Some("Ubuntu 24.04".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.write_cache, WriteCache::ServerDisk);
    assert_eq!(
        catalog.vdisk("ubuntu").await.unwrap().description,
        "Ubuntu 24.04"
    );
    assert_eq!(
        catalog.vdisk("nope").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // clients
    catalog
        .add_client(&client("AA-BB-CC-00-00-01", Some("pc1")))
        .await
        .unwrap();
    catalog
        .add_client(&client("aabbcc000002", Some("pc2")))
        .await
        .unwrap();
    let a: Mac = "aa:bb:cc:00:00:01".parse().unwrap();
    let b: Mac = "aa:bb:cc:00:00:02".parse().unwrap();
    assert_eq!(
        catalog.client(&a).await.unwrap().name.as_deref(),
        Some("pc1")
    );
    let err = catalog
        .add_client(&client("aa:bb:cc:00:00:01", None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let err = catalog
        .add_client(&client("aa:bb:cc:00:00:03", Some("pc1")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("client name \"pc1\" is already used by aa:bb:cc:00:00:01"),
        "{err}"
    );
    let err = catalog
        .update_client(
            &b,
            &ClientChanges {
                hostname: Some(Some("pc1-host".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("hostname \"pc1-host\" is already used"),
        "{err}"
    );
    let updated = catalog
        .update_client(
            &b,
            &ClientChanges {
                notes: Some("desk 2".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.notes, "desk 2");

    // assignments
    let err = catalog.assign(&a, "missing", false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("no such vdisk"), "{err}");
    assert!(
        catalog.assign(&a, "win11", false).await.unwrap().is_default,
        "the first assignment is the default"
    );
    catalog.assign(&a, "ubuntu", true).await.unwrap();
    catalog.assign(&a, "build", false).await.unwrap();
    catalog.assign(&b, "win11", false).await.unwrap();
    catalog.assign(&b, "build", false).await.unwrap();
    let list = catalog.assignments(&a).await.unwrap();
    assert_eq!(
        list.iter().map(|x| x.vdisk.as_str()).collect::<Vec<_>>(),
        ["win11", "ubuntu", "build"]
    );
    assert_eq!(
        list.iter()
            .filter(|x| x.is_default)
            .map(|x| x.vdisk.as_str())
            .collect::<Vec<_>>(),
        ["ubuntu"]
    );
    catalog.unassign(&b, "win11").await.unwrap();
    assert_eq!(
        catalog.unassign(&b, "win11").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // sessions: assignment enforced, one client one session, private lock
    let err = catalog.open_session(&b, "ubuntu", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("not assigned"), "{err}");
    let first = catalog
        .open_session(&a, "win11", Some("10.0.0.1:5000"))
        .await
        .unwrap();
    assert_eq!(first.token.len(), 48);
    assert_eq!(
        catalog.session_by_token(&first.token).await.unwrap().id,
        first.id
    );
    let second = catalog
        .open_session(&a, "build", Some("10.0.0.1:5001"))
        .await
        .unwrap();
    let live: Vec<String> = catalog
        .sessions(false)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        live,
        std::slice::from_ref(&second.id),
        "a new boot of the same client replaces its session"
    );
    assert!(
        catalog
            .session_by_token(&first.token)
            .await
            .unwrap()
            .closed_at
            .is_some()
    );
    assert_eq!(
        catalog.vdisk("build").await.unwrap().locked_by.as_deref(),
        Some(second.id.as_str())
    );
    let err = catalog
        .open_session(&b, "build", Some("10.0.0.2:6000"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let text = err.to_string();
    assert!(
        text.contains("is in use by session")
            && text.contains("aa:bb:cc:00:00:01")
            && text.contains("10.0.0.1:5001"),
        "{text}"
    );
    catalog.close_session(&second.id).await.unwrap();
    assert_eq!(
        catalog.close_session(&second.id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let third = catalog.open_session(&b, "build", None).await.unwrap();
    // A stale lock (a crashed server) is cleared by the administrator.
    catalog.unlock_vdisk("build").await.unwrap();
    assert!(catalog.vdisk("build").await.unwrap().locked_by.is_none());
    catalog.open_session(&a, "build", None).await.unwrap();

    // I/O counters add up.
    for _ in 0..10 {
        catalog.record_io(&third.id, 100, 10).await.unwrap();
    }
    let third_now = catalog
        .sessions(true)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == third.id)
        .unwrap();
    assert_eq!((third_now.bytes_read, third_now.bytes_written), (1000, 100));

    // Leases: touched sessions stay, idle ones expire and free their locks.
    catalog
        .set_session_peer(&third.id, "10.0.0.2:6001")
        .await
        .unwrap();
    catalog
        .touch_sessions(std::slice::from_ref(&third.id))
        .await
        .unwrap();
    assert!(
        catalog.expire_sessions(0).await.unwrap().is_empty(),
        "nothing is idle since the epoch"
    );
    let peers: Vec<Option<String>> = catalog
        .sessions(true)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.id == third.id)
        .map(|s| s.peer)
        .collect();
    assert_eq!(peers, [Some("10.0.0.2:6001".to_owned())]);
    assert!(catalog.vdisk("build").await.unwrap().locked_by.is_some());
    let expired = catalog.expire_sessions(i64::MAX).await.unwrap();
    assert!(!expired.is_empty());
    assert!(catalog.sessions(false).await.unwrap().is_empty());
    assert!(
        catalog.vdisk("build").await.unwrap().locked_by.is_none(),
        "an expired session's lock is released"
    );
    catalog.open_session(&b, "build", None).await.unwrap();

    // removal guarded by live sessions
    let err = catalog.remove_vdisk("build", false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("--force"), "{err}");
    catalog.remove_vdisk("build", true).await.unwrap();
    assert!(catalog.sessions(false).await.unwrap().is_empty());
    assert!(
        !catalog
            .assignments(&a)
            .await
            .unwrap()
            .iter()
            .any(|x| x.vdisk == "build")
    );

    // settings
    assert_eq!(
        catalog.unknown_client_policy().await.unwrap(),
        UnknownClientPolicy::Ignore
    );
    let policy = UnknownClientPolicy::RegisterAndAssign {
        template: a.clone(),
    };
    catalog.set_unknown_client_policy(&policy).await.unwrap();
    assert_eq!(catalog.unknown_client_policy().await.unwrap(), policy);
    let missing = UnknownClientPolicy::RegisterAndAssign {
        template: "00:00:00:00:00:09".parse().unwrap(),
    };
    assert_eq!(
        catalog
            .set_unknown_client_policy(&missing)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    catalog.touch_client(&b).await.unwrap();
    assert!(catalog.client(&b).await.unwrap().first_seen.is_some());
    catalog.remove_client(&a).await.unwrap();
    assert_eq!(
        catalog.client(&a).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(catalog.assignments(&a).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_catalog_passes_the_suite_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    let catalog = SqlCatalog::open(&url).await.unwrap();
    assert_eq!(catalog.flavour(), "sqlite");
    suite(&catalog).await;
    drop(catalog);
    // Reopening applies no migration twice and sees the same data.
    let again = SqlCatalog::open(&url).await.unwrap();
    assert_eq!(again.vdisks().await.unwrap().len(), 2);
    assert!(dir.path().join("catalog.db-wal").exists(), "WAL mode");
}

#[tokio::test]
async fn bad_catalog_urls_are_explained() {
    let err = SqlCatalog::open("mysql://x").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("must start with sqlite:// or postgres://"),
        "{err}"
    );
    let err = SqlCatalog::open("sqlite:///nonexistent/dir/catalog.db")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// A PostgreSQL cluster in a temp dir on its own port, stopped when dropped.
struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    url: String,
}

impl PgCluster {
    fn start() -> PgCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (apt-get install postgresql); scripts/test.sh installs it")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("no initdb under /usr/lib/postgresql");
        let dir = tempfile::Builder::new()
            .prefix("osstream-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        // initdb refuses to run as root: run the cluster as the postgres user.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let run = |args: &[&str]| {
            let mut cmd = if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]);
                c
            } else {
                Command::new(args[0])
            };
            if as_root {
                cmd.args(args);
            } else {
                cmd.args(&args[1..]);
            }
            let out = cmd.output().expect("run a PostgreSQL tool");
            assert!(
                out.status.success(),
                "{args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if as_root {
            assert!(
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let data = dir.join("data");
        let initdb = bin.join("initdb");
        let pg_ctl = bin.join("pg_ctl");
        run(&[
            initdb.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "osstream",
            "--no-sync",
        ]);
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        let log = dir.join("log");
        run(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]);
        PgCluster {
            dir,
            bin,
            url: format!("postgres://osstream@127.0.0.1:{port}/postgres"),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&pg_ctl)
            .args(["-D"])
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output()
            .or_else(|_| {
                Command::new(&pg_ctl)
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "immediate", "stop"])
                    .output()
            });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn postgres_catalog_passes_the_same_suite() {
    let cluster = PgCluster::start();
    let catalog = SqlCatalog::open(&cluster.url).await.unwrap();
    assert_eq!(catalog.flavour(), "postgres");
    suite(&catalog).await;
    // A second server on the same database finds the schema in place.
    let second = SqlCatalog::open(&cluster.url).await.unwrap();
    assert_eq!(second.vdisks().await.unwrap().len(), 2);
}
