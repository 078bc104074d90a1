//! The catalog suite, run on SQLite and on a throwaway PostgreSQL cluster started by the
//! test itself (initdb in a temp dir, its own port on loopback).

mod common;

use osstream_catalog::{
    BootMethod, Catalog, Client, ClientChanges, Mac, SqlCatalog, UnknownClientPolicy, Vdisk,
    VdiskChanges, VdiskMode, WriteCache,
};
use osstream_core::ErrorKind;

use common::PgCluster;

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
        image_id: Some(format!("file:/srv/{name}.img")),
    }
}

fn client(mac: &str, name: Option<&str>) -> Client {
    Client {
        mac: mac.parse().unwrap(),
        ip: None,
        name: name.map(str::to_owned),
        hostname: name.map(|n| format!("{n}-host")),
        group: Some("lab".into()),
        notes: String::new(),
        first_seen: None,
        last_seen: None,
        created_at: 0,
    }
}

async fn suite(catalog: &SqlCatalog) {
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
    catalog
        .close_session(&second.id, "closed by a test")
        .await
        .unwrap();
    assert_eq!(
        catalog
            .close_session(&second.id, "again")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    let closed = catalog.session_by_token(&second.token).await.unwrap();
    assert_eq!(closed.end_reason.as_deref(), Some("closed by a test"));
    assert!(
        osstream_catalog::ended(&closed)
            .to_string()
            .contains("has ended: closed by a test")
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

    catalog
        .set_session_peer(&third.id, "10.0.0.2:6001")
        .await
        .unwrap();
    let peers: Vec<Option<String>> = catalog
        .sessions(true)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.id == third.id)
        .map(|s| s.peer)
        .collect();
    assert_eq!(peers, [Some("10.0.0.2:6001".to_owned())]);
    let unlocked = catalog.session_by_token(&third.token).await.unwrap();
    assert!(
        unlocked
            .end_reason
            .as_deref()
            .is_some_and(|r| r.contains("cleared by an administrator")),
        "{unlocked:?}"
    );
    let replaced = catalog.session_by_token(&first.token).await.unwrap();
    assert!(
        replaced
            .end_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("replaced by the client's new session")),
        "{replaced:?}"
    );
    catalog.unlock_vdisk("build").await.unwrap();
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

fn me(id: &str, instance: &str) -> osstream_catalog::ServerRef {
    osstream_catalog::ServerRef {
        id: id.into(),
        instance: instance.into(),
    }
}

const TIMERS: osstream_catalog::SessionTimers = osstream_catalog::SessionTimers {
    grace_ms: 60_000,
    lease_ms: 600_000,
    server_timeout_ms: 15_000,
};

/// Issue 12, items 4, 6, 8, 9, 10 at the catalog: one image under one mode, one server
/// per session, sessions that outlive a reconnect, lock epochs that fence old holders,
/// servers that restart or vanish.
async fn ownership(catalog: &SqlCatalog) {
    use osstream_catalog::{Holding, reasons};
    use osstream_core::LockToken;

    // One image under two modes is refused, whatever the vdisks are called.
    let mut std_vdisk = vdisk("o-std", VdiskMode::Standard);
    std_vdisk.write_cache = WriteCache::ServerDisk;
    catalog.add_vdisk(&std_vdisk).await.unwrap();
    catalog
        .add_vdisk(&vdisk("o-dev", VdiskMode::Private))
        .await
        .unwrap();
    catalog
        .add_vdisk(&vdisk("o-ram", VdiskMode::Standard))
        .await
        .unwrap();
    let mut twin = vdisk("o-dev-twin", VdiskMode::Standard);
    twin.image_id = Some("file:/srv/o-dev.img".into());
    let err = catalog.add_vdisk(&twin).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("private vdisk \"o-dev\""), "{err}");
    twin.mode = VdiskMode::Private;
    twin.image_id = Some("file:/srv/o-std.img".into());
    let err = catalog.add_vdisk(&twin).await.unwrap_err();
    assert!(
        err.to_string().contains("standard vdisk \"o-std\""),
        "{err}"
    );
    twin.mode = VdiskMode::Standard;
    catalog.add_vdisk(&twin).await.unwrap();
    let err = catalog
        .update_vdisk(
            "o-dev-twin",
            &VdiskChanges {
                mode: Some(VdiskMode::Private),
                ..VdiskChanges::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    catalog.remove_vdisk("o-dev-twin", false).await.unwrap();

    let (a, b): (Mac, Mac) = (
        "aa:bb:cc:00:01:01".parse().unwrap(),
        "aa:bb:cc:00:01:02".parse().unwrap(),
    );
    for mac in [&a, &b] {
        catalog
            .add_client(&client(mac.as_str(), None))
            .await
            .unwrap();
        for v in ["o-std", "o-dev", "o-ram"] {
            catalog.assign(mac, v, false).await.unwrap();
        }
    }
    let (server_a, server_b) = (me("srv-a", "a1"), me("srv-b", "b1"));
    catalog.register_server(&server_a, "host-a").await.unwrap();
    catalog.register_server(&server_b, "host-b").await.unwrap();
    catalog
        .set_server_address(&server_a, Some("10.0.0.1:10809"))
        .await
        .unwrap();
    catalog.heartbeat(&server_a).await.unwrap();
    assert_eq!(catalog.live_servers(15_000).await.unwrap().len(), 2);
    let image = |v: &str| format!("file:/srv/{v}.img");
    fn img(v: &str) -> osstream_catalog::ImageRef<'static> {
        osstream_catalog::ImageRef {
            identity: Box::leak(format!("file:/srv/{v}.img").into_boxed_str()),
            backend: "images",
            key: Box::leak(v.to_owned().into_boxed_str()),
        }
    }

    // A standard session is held by one server; its overlay never moves.
    let s = catalog.open_session(&a, "o-std", None).await.unwrap();
    assert_eq!(
        catalog
            .attach_session(&s.id, &server_a, img("o-std"), "10.0.0.9:1", &TIMERS)
            .await
            .unwrap(),
        Holding {
            epoch: 0,
            image_epoch: 0,
            image: image("o-std"),
            taken_from: None,
        }
    );
    let err = catalog
        .attach_session(&s.id, &server_b, img("o-std"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        err.to_string()
            .contains("keeps its write overlay on server host-a (10.0.0.1:10809)"),
        "{err}"
    );
    catalog
        .detach_session(&s.id, &server_a, true, false)
        .await
        .unwrap();
    let now = catalog.session_by_token(&s.token).await.unwrap();
    assert!(!now.attached && now.detached_at.is_some() && now.owner.as_deref() == Some("srv-a"));
    assert!(
        catalog
            .attach_session(&s.id, &server_b, img("o-std"), "10.0.0.9:1", &TIMERS)
            .await
            .is_err(),
        "still held by A within the grace period"
    );
    assert_eq!(
        catalog.held_sessions(&server_a).await.unwrap(),
        [s.id.clone()].into_iter().collect()
    );

    // A private session: the epoch grows with every holding; an old lock is fenced.
    let p = catalog.open_session(&b, "o-dev", None).await.unwrap();
    let first = catalog
        .attach_session(&p.id, &server_a, img("o-dev"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    assert_eq!(first.epoch, 1);
    let again = catalog
        .attach_session(&p.id, &server_a, img("o-dev"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    assert_eq!(again.epoch, 1, "a second connection joins the same holding");
    let err = catalog
        .attach_session(&p.id, &server_b, img("o-dev"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is attached on server host-a"),
        "{err}"
    );
    let lock = |epoch| LockToken {
        vdisk: "o-dev".into(),
        session: p.id.clone(),
        image: image("o-dev"),
        epoch,
        overlay: false,
    };
    catalog.check_lock(&lock(1)).await.unwrap();
    let used = catalog.image_use(img("o-dev")).await.unwrap();
    assert_eq!(used.writer, Some(("o-dev".into(), p.id.clone())));
    assert!(catalog.locked_images().await.unwrap().contains(&(
        Some(image("o-dev")),
        "images".into(),
        "o-dev".into()
    )));
    // A standard session of the same image (a registration from before the checks, or a
    // backend reconfigured onto the same folder, which this server sees) is refused while
    // the private one writes.
    let r = catalog.open_session(&a, "o-ram", None).await.unwrap();
    let seen = osstream_catalog::ImageRef {
        identity: "file:/srv/o-dev.img",
        backend: "images",
        key: "o-ram",
    };
    let err = catalog
        .attach_session(&r.id, &server_b, seen, "10.0.0.9:1", &TIMERS)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("being written by private vdisk \"o-dev\""),
        "{err}"
    );
    // Another host's name for the image (a LUN's major:minor differs per host) is still
    // matched by backend and key.
    let elsewhere = osstream_catalog::ImageRef {
        identity: "block:8:32",
        backend: "images",
        key: "o-dev",
    };
    assert_eq!(
        catalog.image_use(elsewhere).await.unwrap().writer,
        Some(("o-dev".into(), p.id.clone()))
    );
    // The private holder lets go on its last disconnect: another server takes it.
    catalog
        .detach_session(&p.id, &server_a, true, true)
        .await
        .unwrap();
    let second = catalog
        .attach_session(&p.id, &server_b, img("o-dev"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    assert_eq!(second.epoch, 2);
    let err = catalog.check_lock(&lock(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("lost the lock"), "{err}");
    catalog.check_lock(&lock(2)).await.unwrap();

    // Handover: the next holder waits while the previous one still has connections.
    let next = catalog.open_session(&a, "o-dev", None);
    let err = next.await.unwrap_err();
    assert!(err.to_string().contains("is in use by session"), "{err}");
    catalog
        .close_session(&p.id, "closed by a test")
        .await
        .unwrap();
    catalog.check_lock(&lock(2)).await.unwrap_err();
    let q = catalog.open_session(&a, "o-dev", None).await.unwrap();
    let err = catalog
        .attach_session(&q.id, &server_a, img("o-dev"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap_err();
    assert!(err.is_temporary(), "{err}");
    assert!(
        err.to_string().contains("still has connections open"),
        "{err}"
    );
    catalog
        .detach_session(&p.id, &server_b, true, true)
        .await
        .unwrap();
    assert_eq!(
        catalog
            .attach_session(&q.id, &server_a, img("o-dev"), "10.0.0.9:1", &TIMERS)
            .await
            .unwrap()
            .epoch,
        3
    );

    // A server that stops answering: others release what it held.
    let quick = osstream_catalog::SessionTimers {
        server_timeout_ms: 1,
        ..TIMERS
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    catalog.heartbeat(&server_b).await.unwrap();
    let released = catalog.reap_sessions(&server_b, &quick).await.unwrap();
    assert!(
        released
            .iter()
            .any(|(s, why)| s.id == q.id && why.contains("released")),
        "{released:?}"
    );
    let taken = catalog
        .attach_session(&q.id, &server_b, img("o-dev"), "10.0.0.9:1", &quick)
        .await
        .unwrap();
    assert_eq!(
        taken.epoch, 4,
        "another server took the lapsed holder's session"
    );
    catalog
        .detach_session(&q.id, &server_b, true, true)
        .await
        .unwrap();

    // A restart of server A: a RAM session ends with the reason, a disk one stays.
    catalog
        .attach_session(&r.id, &server_a, img("o-ram"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap_err(); // client a's session on o-ram was replaced by q
    let r = catalog.open_session(&b, "o-ram", None).await.unwrap();
    catalog
        .attach_session(&r.id, &server_a, img("o-ram"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    let s2 = catalog.open_session(&a, "o-std", None).await.unwrap();
    catalog
        .attach_session(&s2.id, &server_a, img("o-std"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    let restarted = me("srv-a", "a2");
    catalog.register_server(&restarted, "host-a").await.unwrap();
    let adopted = catalog.adopt_sessions(&restarted).await.unwrap();
    assert!(
        adopted
            .iter()
            .any(|(s, what)| s.id == r.id && what.contains(reasons::RAM_OVERLAY_LOST)),
        "{adopted:?}"
    );
    let ended_r = catalog.session_by_token(&r.token).await.unwrap();
    assert_eq!(
        ended_r.end_reason.as_deref(),
        Some(reasons::RAM_OVERLAY_LOST)
    );
    let kept = catalog.session_by_token(&s2.token).await.unwrap();
    assert!(kept.closed_at.is_none() && !kept.attached && kept.detached_at.is_some());
    assert_eq!(
        catalog
            .attach_session(&s2.id, &restarted, img("o-std"), "10.0.0.9:1", &TIMERS)
            .await
            .unwrap()
            .epoch,
        0
    );
    catalog
        .detach_session(&s2.id, &restarted, true, false)
        .await
        .unwrap();

    // Grace and lease end sessions, with reasons.
    let waiting = catalog.open_session(&b, "o-std", None).await.unwrap();
    let quick = osstream_catalog::SessionTimers {
        grace_ms: 0,
        lease_ms: 0,
        ..TIMERS
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let reaped = catalog.reap_sessions(&server_b, &quick).await.unwrap();
    let why = |id: &str| {
        reaped
            .iter()
            .find(|(s, _)| s.id == id)
            .map(|(_, why)| why.clone())
            .unwrap_or_default()
    };
    assert!(
        why(&s2.id).contains("no connection for 0s after its last one closed"),
        "{reaped:?}"
    );
    assert!(
        why(&waiting.id).contains("nobody connected within the lease"),
        "{reaped:?}"
    );
    assert!(
        catalog
            .sessions(false)
            .await
            .unwrap()
            .iter()
            .all(|s| !s.vdisk.starts_with("o-"))
    );

    // A clean stop ends the RAM sessions held there and marks the server stopped.
    let r = catalog.open_session(&a, "o-ram", None).await.unwrap();
    catalog
        .attach_session(&r.id, &restarted, img("o-ram"), "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    let stopped = catalog.stop_server(&restarted).await.unwrap();
    assert_eq!(
        stopped.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&r.id)
    );
    assert!(
        catalog
            .live_servers(15_000)
            .await
            .unwrap()
            .iter()
            .all(|s| s.id != "srv-a")
    );
}

#[tokio::test]
async fn sqlite_catalog_keeps_sessions_to_one_server_and_fences_old_holders() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    let catalog = SqlCatalog::open(&url).await.unwrap();
    ownership(&catalog).await;
    shared_overlay_moves(&catalog).await;
    retired_server_removed(&catalog).await;
}

#[tokio::test]
async fn postgres_catalog_keeps_sessions_to_one_server_and_fences_old_holders() {
    let cluster = PgCluster::start();
    let catalog = SqlCatalog::open(&cluster.url).await.unwrap();
    ownership(&catalog).await;
    shared_overlay_moves(&catalog).await;
    retired_server_removed(&catalog).await;
}

/// Issue 17: a standard session whose overlay is on shared storage (`shared-disk`) stays
/// with its live server like any standard session, moves to another server once its
/// own is gone, and each move grows the session's epoch, which fences the old holding.
async fn shared_overlay_moves(catalog: &SqlCatalog) {
    use osstream_core::LockToken;

    let mut shared = vdisk("sh-std", VdiskMode::Standard);
    shared.write_cache = WriteCache::SharedDisk;
    catalog.add_vdisk(&shared).await.unwrap();
    let mac = client_assigned(catalog, "aa:bb:cc:00:02:01", "sh-std").await;
    let (server_c, server_d) = (me("srv-c", "c1"), me("srv-d", "d1"));
    catalog.register_server(&server_c, "host-c").await.unwrap();
    catalog.register_server(&server_d, "host-d").await.unwrap();
    let image = osstream_catalog::ImageRef {
        identity: "file:/srv/sh-std.img",
        backend: "images",
        key: "sh-std",
    };
    let s = catalog.open_session(&mac, "sh-std", None).await.unwrap();
    let first = catalog
        .attach_session(&s.id, &server_c, image, "10.0.0.9:1", &TIMERS)
        .await
        .unwrap();
    assert_eq!(first.epoch, 1);
    let lock = |epoch| LockToken {
        vdisk: "sh-std".into(),
        session: s.id.clone(),
        image: first.image.clone(),
        epoch,
        overlay: true,
    };
    catalog.check_lock(&lock(1)).await.unwrap();
    let err = catalog
        .attach_session(&s.id, &server_d, image, "10.0.0.9:2", &TIMERS)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("which holds it; connect there"),
        "{err}"
    );

    // Its server stops (or dies): the next server takes it under a new epoch.
    catalog.stop_server(&server_c).await.unwrap();
    let moved = catalog
        .attach_session(&s.id, &server_d, image, "10.0.0.9:2", &TIMERS)
        .await
        .unwrap();
    assert_eq!(moved.epoch, 2);
    let err = catalog.check_lock(&lock(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        err.to_string()
            .contains("another server took the session (epoch 2, this holding has 1)")
            && err
                .to_string()
                .contains("the shared write overlay of vdisk \"sh-std\""),
        "{err}"
    );
    catalog.check_lock(&lock(2)).await.unwrap();
    catalog
        .close_session(&s.id, "closed by a test")
        .await
        .unwrap();
    let err = catalog.check_lock(&lock(2)).await.unwrap_err();
    assert!(err.to_string().contains("the session ended"), "{err}");
}

/// A new client `mac` with `vdisk` assigned.
async fn client_assigned(catalog: &SqlCatalog, mac: &str, vdisk: &str) -> Mac {
    let mac: Mac = mac.parse().unwrap();
    catalog
        .add_client(&client(mac.as_str(), None))
        .await
        .unwrap();
    catalog.assign(&mac, vdisk, false).await.unwrap();
    mac
}

/// `server rm`: a retired server is forgotten, never one that runs or that a session
/// still points at (held, or placed there before any server held it).
async fn retired_server_removed(catalog: &SqlCatalog) {
    catalog
        .add_vdisk(&vdisk("rm-std", VdiskMode::Standard))
        .await
        .unwrap();
    let mac = client_assigned(catalog, "aa:bb:cc:00:03:01", "rm-std").await;
    let server = me("srv-e", "e1");
    catalog.register_server(&server, "host-e").await.unwrap();
    let timeout = TIMERS.server_timeout_ms;

    let err = catalog.remove_server("host-e", timeout).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("is alive"), "{err}");

    let s = catalog.open_session(&mac, "rm-std", None).await.unwrap();
    catalog.record_placement(&s.id, "srv-e").await.unwrap();
    assert_eq!(
        catalog.session(&s.id).await.unwrap().placed_on.as_deref(),
        Some("srv-e")
    );
    catalog.stop_server(&server).await.unwrap();
    let err = catalog.remove_server("srv-e", timeout).await.unwrap_err();
    assert!(
        err.to_string().contains("still has 1 open session(s)"),
        "{err}"
    );

    catalog
        .close_session(&s.id, "closed by a test")
        .await
        .unwrap();
    let removed = catalog.remove_server("host-e", timeout).await.unwrap();
    assert_eq!(removed.id, "srv-e");
    let registered = async || {
        catalog
            .servers()
            .await
            .unwrap()
            .iter()
            .any(|s| s.id == "srv-e")
    };
    assert!(!registered().await);
    let err = catalog.remove_server("host-e", timeout).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // Its old instance, only cut off, is told why its heartbeat fails and registers again.
    let err = catalog.heartbeat(&server).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string().contains("was removed from the catalog"),
        "{err}"
    );
    let registration = osstream_catalog::Registration {
        name: "host-e".into(),
        nbd_address: Some("10.0.0.5:10809".into()),
        offer: osstream_catalog::ServerOffer {
            http_url: None,
            capacity: 2.0,
            subnets: Vec::new(),
            shared_overlays: false,
            server_timeout_ms: timeout,
        },
    };
    catalog.rejoin(&server, &registration).await.unwrap();
    catalog.heartbeat(&server).await.unwrap();
    let back = catalog.server_named("host-e").await.unwrap();
    assert_eq!(
        (back.nbd_address.as_deref(), back.capacity),
        (Some("10.0.0.5:10809"), 2.0)
    );
    assert!(registered().await);
}

/// A catalog as the first release made it (migration 1 only), with a client, vdisks,
/// assignments, a policy and sessions in every state.
async fn first_release_catalog(url: &str) {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let url = if url.starts_with("sqlite:") {
        format!("{url}?mode=rwc")
    } else {
        url.to_owned()
    };
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    pool.execute(
        "CREATE TABLE IF NOT EXISTS osstream_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await
    .unwrap();
    sqlx::raw_sql(include_str!("../migrations/0001_init.sql"))
        .execute(&pool)
        .await
        .unwrap();
    for statement in [
        "INSERT INTO osstream_migrations (version, applied_at) VALUES (1, 1700000000000)",
        "INSERT INTO clients (mac, name, hostname, client_group, notes, first_seen, last_seen, created_at) \
         VALUES ('aa:bb:cc:00:09:01', 'pc1', 'pc1-host', 'lab', 'desk 1', 1700000000100, 1700000000200, 1700000000000)",
        "INSERT INTO vdisks (name, backend, image_key, size, mode, write_cache, boot, kernel, initrd, cmdline, description, enabled, locked_by, created_at) \
         VALUES ('win11', 'images', 'win11', 67108864, 'standard', 'ram', 'sanboot', NULL, NULL, NULL, 'Windows', 1, NULL, 1700000000000)",
        "INSERT INTO vdisks (name, backend, image_key, size, mode, write_cache, boot, kernel, initrd, cmdline, description, enabled, locked_by, created_at) \
         VALUES ('dev', 'images', 'dev', 67108864, 'private', 'ram', 'linux-nbd', 'vmlinuz', 'initrd', 'ro', '', 1, 's-dev', 1700000000000)",
        "INSERT INTO vdisks (name, backend, image_key, size, mode, write_cache, boot, kernel, initrd, cmdline, description, enabled, locked_by, created_at) \
         VALUES ('kiosk', 'images', 'kiosk', 67108864, 'standard', 'server-disk', 'sanboot', NULL, NULL, NULL, '', 0, NULL, 1700000000000)",
        "INSERT INTO assignments (mac, vdisk, position, is_default) VALUES ('aa:bb:cc:00:09:01', 'win11', 0, 0)",
        "INSERT INTO assignments (mac, vdisk, position, is_default) VALUES ('aa:bb:cc:00:09:01', 'dev', 1, 1)",
        "INSERT INTO settings (key, value) VALUES ('unknown_client_policy', 'register')",
        // A RAM-overlay session a client used, a private one holding its lock, one opened
        // but never used, and one that ended.
        "INSERT INTO sessions (id, token, mac, vdisk, peer, started_at, last_active, bytes_read, bytes_written, closed_at) \
         VALUES ('s-win', 'token-win', 'aa:bb:cc:00:09:01', 'win11', '10.0.0.9:1000', 1700000000300, 1700000000400, 10, 20, NULL)",
        "INSERT INTO sessions (id, token, mac, vdisk, peer, started_at, last_active, bytes_read, bytes_written, closed_at) \
         VALUES ('s-dev', 'token-dev', 'aa:bb:cc:00:09:01', 'dev', '10.0.0.9:1001', 1700000000500, 1700000000600, 0, 0, NULL)",
        "INSERT INTO sessions (id, token, mac, vdisk, peer, started_at, last_active, bytes_read, bytes_written, closed_at) \
         VALUES ('s-kiosk', 'token-kiosk', 'aa:bb:cc:00:09:01', 'kiosk', NULL, 1700000000700, 1700000000700, 0, 0, NULL)",
        "INSERT INTO sessions (id, token, mac, vdisk, peer, started_at, last_active, bytes_read, bytes_written, closed_at) \
         VALUES ('s-old', 'token-old', 'aa:bb:cc:00:09:01', 'win11', '10.0.0.9:999', 1600000000000, 1600000000000, 5, 5, 1600000000100)",
    ] {
        pool.execute(statement).await.unwrap();
    }
    pool.close().await;
}

/// Issue 13: a catalog made by an earlier release opens under this code with everything
/// kept, and its live sessions are handled as the upgrade note in migration 2 says.
async fn upgrade(url: &str) {
    first_release_catalog(url).await;
    let catalog = SqlCatalog::open(url).await.unwrap();
    let a: Mac = "aa:bb:cc:00:09:01".parse().unwrap();
    let client = catalog.client(&a).await.unwrap();
    assert_eq!(
        (
            client.name.as_deref(),
            client.hostname.as_deref(),
            client.group.as_deref(),
            client.notes.as_str(),
            client.last_seen
        ),
        (
            Some("pc1"),
            Some("pc1-host"),
            Some("lab"),
            "desk 1",
            Some(1700000000200)
        )
    );
    let dev = catalog.vdisk("dev").await.unwrap();
    assert_eq!(
        (
            dev.mode,
            dev.boot,
            dev.kernel.as_deref(),
            dev.locked_by.as_deref(),
            dev.image_id
        ),
        (
            VdiskMode::Private,
            BootMethod::LinuxNbd,
            Some("vmlinuz"),
            Some("s-dev"),
            None
        )
    );
    assert!(!catalog.vdisk("kiosk").await.unwrap().enabled);
    let menu: Vec<(String, bool)> = catalog
        .assignments(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|x| (x.vdisk, x.is_default))
        .collect();
    assert_eq!(menu, [("win11".into(), false), ("dev".into(), true)]);
    assert_eq!(
        catalog.unknown_client_policy().await.unwrap(),
        UnknownClientPolicy::Register
    );
    let by = |token: &str| {
        let catalog = catalog.clone();
        let token = token.to_owned();
        async move { catalog.session_by_token(&token).await.unwrap() }
    };
    // The RAM overlay went with the old server process.
    let win = by("token-win").await;
    assert!(win.closed_at.is_some(), "{win:?}");
    assert!(
        win.end_reason
            .unwrap()
            .contains("RAM write overlay went with the old server")
    );
    assert_eq!((win.bytes_read, win.bytes_written), (10, 20));
    // The private session keeps its lock and counts as disconnected since it was last used.
    let dev_session = by("token-dev").await;
    assert!(dev_session.closed_at.is_none() && !dev_session.attached);
    assert_eq!(dev_session.detached_at, Some(1700000000600));
    // Never used: still waiting for its client.
    let kiosk = by("token-kiosk").await;
    assert!(kiosk.closed_at.is_none() && kiosk.detached_at.is_none());
    assert_eq!(by("token-old").await.closed_at, Some(1600000000100));
    // From here the new rules apply: the grace ends the private session and frees its lock,
    // the lease ends the unused one.
    let me = me("srv-up", "u1");
    catalog.register_server(&me, "host-up").await.unwrap();
    let quick = osstream_catalog::SessionTimers {
        grace_ms: 1000,
        lease_ms: 1000,
        server_timeout_ms: 15_000,
    };
    let reaped = catalog.reap_sessions(&me, &quick).await.unwrap();
    assert_eq!(reaped.len(), 2, "{reaped:?}");
    assert!(catalog.vdisk("dev").await.unwrap().locked_by.is_none());
    assert!(catalog.sessions(false).await.unwrap().is_empty());
    // Tables added since (boot profiles) work on the upgraded catalog.
    use osstream_core::ProfileStore;
    let boot = osstream_core::RecordedBoot {
        vdisk: "win11".into(),
        image: "file:/srv/win11.img".into(),
        generation: "g".into(),
        block_size: 65536,
        touched: vec![3, 4],
    };
    assert_eq!(catalog.record_boot(&boot).await.unwrap().boots, 1);
}

#[tokio::test]
async fn a_sqlite_catalog_of_the_first_release_upgrades_with_everything_kept() {
    let dir = tempfile::tempdir().unwrap();
    upgrade(&format!(
        "sqlite://{}",
        dir.path().join("catalog.db").display()
    ))
    .await;
}

#[tokio::test]
async fn a_postgres_catalog_of_the_first_release_upgrades_with_everything_kept() {
    let cluster = PgCluster::start();
    upgrade(&cluster.url).await;
}
