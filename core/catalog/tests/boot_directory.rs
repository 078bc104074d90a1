//! The catalog as the engine's `BootDirectory`, on SQLite and on a throwaway PostgreSQL
//! cluster: what boot protocols see of clients, menus, the unknown-client policy and
//! sessions, and that no client sees another's vdisks.

mod common;

use osstream_catalog::{
    BootMethod, Catalog, Client, SqlCatalog, UnknownClientPolicy, Vdisk, VdiskChanges, VdiskMode,
    WriteCache,
};
use osstream_core::{BootDirectory, BootKind, ErrorKind, LeaseStore, OverlayKind, UnknownPolicy};

use common::PgCluster;

/// A client with a menu of two vdisks; `ubuntu` first, `win11` the default.
const PC1: &str = "aa:bb:cc:00:00:01";
/// Another client, with vdisks of its own.
const PC2: &str = "aa:bb:cc:00:00:02";
/// A MAC the catalog does not know at first.
const STRANGER: &str = "aa:bb:cc:00:00:99";

fn vdisk(name: &str, mode: VdiskMode, boot: BootMethod) -> Vdisk {
    Vdisk {
        name: name.into(),
        backend: "images".into(),
        key: name.into(),
        size: 64 << 20,
        mode,
        write_cache: WriteCache::Ram,
        boot,
        kernel: None,
        initrd: None,
        cmdline: None,
        description: format!("{name} for tests"),
        enabled: true,
        locked_by: None,
        created_at: 0,
        image_id: Some(format!("file:/srv/{name}.img")),
    }
}

fn client(mac: &str, name: &str) -> Client {
    Client {
        mac: mac.parse().unwrap(),
        ip: None,
        name: Some(name.into()),
        hostname: Some(format!("{name}-host")),
        group: Some("lab".into()),
        notes: String::new(),
        first_seen: None,
        last_seen: None,
        created_at: 0,
    }
}

/// Two clients with menus of their own, as an administrator would set them up.
async fn populate(catalog: &SqlCatalog) {
    let ubuntu = Vdisk {
        kernel: Some("ubuntu-vmlinuz".into()),
        initrd: Some("ubuntu-initrd".into()),
        cmdline: Some("quiet".into()),
        ..vdisk("ubuntu", VdiskMode::Standard, BootMethod::LinuxNbd)
    };
    let vdisks = [
        ubuntu,
        vdisk("win11", VdiskMode::Standard, BootMethod::Sanboot),
        vdisk("old", VdiskMode::Standard, BootMethod::Sanboot),
        vdisk("secret", VdiskMode::Standard, BootMethod::Sanboot),
        vdisk("build", VdiskMode::Private, BootMethod::LinuxNbd),
    ];
    for vdisk in &vdisks {
        catalog.add_vdisk(vdisk).await.unwrap();
    }
    catalog.add_client(&client(PC1, "pc1")).await.unwrap();
    catalog.add_client(&client(PC2, "pc2")).await.unwrap();
    let pc1 = PC1.parse().unwrap();
    let pc2 = PC2.parse().unwrap();
    // The default is the second entry, so menu order cannot be mistaken for "default first".
    catalog.assign(&pc1, "ubuntu", false).await.unwrap();
    catalog.assign(&pc1, "win11", true).await.unwrap();
    catalog.assign(&pc2, "secret", true).await.unwrap();
    catalog.assign(&pc2, "build", false).await.unwrap();
}

fn menu_names(menu: &[osstream_core::BootChoice]) -> Vec<&str> {
    menu.iter().map(|choice| choice.vdisk.as_str()).collect()
}

async fn known_clients_and_menus(catalog: &SqlCatalog) {
    // Any spelling of a MAC finds the client; records carry the normalised form.
    let pc1 = catalog
        .known_client("AA-BB-CC-00-00-01")
        .await
        .unwrap()
        .expect("pc1 is known");
    assert_eq!(pc1.mac, PC1);
    assert_eq!(pc1.name.as_deref(), Some("pc1"));
    assert_eq!(pc1.hostname.as_deref(), Some("pc1-host"));
    assert_eq!(pc1.group.as_deref(), Some("lab"));
    assert_eq!(catalog.known_client(STRANGER).await.unwrap(), None);
    let err = catalog.known_client("not-a-mac").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let menu = catalog.boot_menu("aabbcc000001").await.unwrap();
    assert_eq!(menu_names(&menu), ["ubuntu", "win11"]);
    let defaults: Vec<bool> = menu.iter().map(|choice| choice.is_default).collect();
    assert_eq!(defaults, [false, true]);
    let ubuntu = &menu[0];
    assert_eq!(ubuntu.boot, BootKind::LinuxNbd);
    assert_eq!(ubuntu.kernel.as_deref(), Some("ubuntu-vmlinuz"));
    assert_eq!(ubuntu.initrd.as_deref(), Some("ubuntu-initrd"));
    assert_eq!(ubuntu.cmdline.as_deref(), Some("quiet"));
    assert_eq!(ubuntu.backend, "images");
    assert_eq!(ubuntu.description, "ubuntu for tests");
    assert!(ubuntu.enabled);
    assert_eq!(menu[1].boot, BootKind::Sanboot);
    assert!(catalog.boot_menu(STRANGER).await.unwrap().is_empty());

    // A disabled vdisk stays on the menu, marked, and opens no session.
    let pc1_mac = PC1.parse().unwrap();
    catalog.assign(&pc1_mac, "old", false).await.unwrap();
    catalog
        .update_vdisk(
            "old",
            &VdiskChanges {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let menu = catalog.boot_menu(PC1).await.unwrap();
    assert_eq!(menu_names(&menu), ["ubuntu", "win11", "old"]);
    assert!(!menu[2].enabled);
    let err = catalog
        .open_boot_session(PC1, "old", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    catalog.unassign(&pc1_mac, "old").await.unwrap();
}

async fn no_client_sees_another_clients_vdisks(catalog: &SqlCatalog) {
    assert_eq!(
        menu_names(&catalog.boot_menu(PC1).await.unwrap()),
        ["ubuntu", "win11"]
    );
    assert_eq!(
        menu_names(&catalog.boot_menu(PC2).await.unwrap()),
        ["secret", "build"]
    );
    for theirs in ["secret", "build"] {
        let err = catalog
            .open_boot_session(PC1, theirs, None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{theirs}: {err}");
        assert!(err.to_string().contains("not assigned"), "{err}");
    }
    let err = catalog
        .open_boot_session(STRANGER, "ubuntu", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = catalog
        .open_boot_session(PC1, "nope", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(catalog.sessions(false).await.unwrap().is_empty());
}

async fn sessions_open_for_booting_clients(catalog: &SqlCatalog) {
    let session = catalog
        .open_boot_session("AABBCC000001", "win11", Some("10.0.0.5:40000"))
        .await
        .unwrap();
    assert!(!session.token.is_empty());
    assert_eq!(session.export, format!("s/{}", session.token));
    assert_eq!(session.mac, PC1);
    assert_eq!(session.vdisk, "win11");
    assert_eq!(session.overlay, Some(OverlayKind::Ram));
    assert!(!session.is_private());
    // The token is a bearer secret: debug output (logs) must not carry it.
    let shown = format!("{session:?}");
    assert!(!shown.contains(&session.token), "{shown}");
    assert!(shown.contains(&session.id), "{shown}");

    let recorded = catalog.session_by_token(&session.token).await.unwrap();
    assert_eq!(recorded.id, session.id);
    assert_eq!(recorded.mac.as_str(), PC1);
    assert_eq!(recorded.vdisk, "win11");
    assert_eq!(recorded.peer.as_deref(), Some("10.0.0.5:40000"));
    assert_eq!(recorded.closed_at, None);
    let pc1 = catalog.known_client(PC1).await.unwrap().unwrap();
    assert!(pc1.first_seen.is_some() && pc1.last_seen.is_some());

    // One client, one session: the next boot replaces this one.
    let next = catalog
        .open_boot_session(PC1, "ubuntu", None)
        .await
        .unwrap();
    assert_ne!(next.token, session.token);
    let live: Vec<String> = catalog
        .sessions(false)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.mac.as_str() == PC1)
        .map(|s| s.id)
        .collect();
    assert_eq!(live, std::slice::from_ref(&next.id));

    // A live session's token tells boot protocols its vdisk's boot files; a replaced
    // session's token, or a made-up one, tells nothing.
    let (by_token, choice) = catalog.session_boot(&next.token).await.unwrap();
    assert_eq!(by_token.id, next.id);
    assert_eq!(choice.vdisk, "ubuntu");
    assert_eq!(choice.kernel.as_deref(), Some("ubuntu-vmlinuz"));
    assert_eq!(choice.initrd.as_deref(), Some("ubuntu-initrd"));
    for gone in [session.token.as_str(), "no-such-token"] {
        let err = catalog.session_boot(gone).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }

    let private = catalog.open_boot_session(PC2, "build", None).await.unwrap();
    assert!(private.is_private());
    assert_eq!(private.overlay, None);

    // Seen without a session (a DHCP request): recorded; an unknown MAC changes nothing.
    let pc2 = PC2.parse().unwrap();
    let before = catalog.client(&pc2).await.unwrap().last_seen;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    catalog.client_seen("aa-bb-cc-00-00-02").await.unwrap();
    assert!(catalog.client(&pc2).await.unwrap().last_seen > before);
    catalog.client_seen(STRANGER).await.unwrap();
    assert_eq!(catalog.known_client(STRANGER).await.unwrap(), None);
}

async fn unknown_clients_follow_the_policy(catalog: &SqlCatalog) {
    // Ignore (the default): nobody is registered.
    assert_eq!(
        catalog.unknown_policy().await.unwrap(),
        UnknownPolicy::Ignore
    );
    let err = catalog
        .register_client(STRANGER, "DHCP on eth0")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let message = err.to_string();
    assert!(
        message.contains(STRANGER) && message.contains("ignore"),
        "{message}"
    );
    assert_eq!(catalog.known_client(STRANGER).await.unwrap(), None);

    // Register: the client exists afterwards, seen, with no vdisks.
    catalog
        .set_unknown_client_policy(&UnknownClientPolicy::Register)
        .await
        .unwrap();
    assert_eq!(
        catalog.unknown_policy().await.unwrap(),
        UnknownPolicy::Register
    );
    let registered = catalog
        .register_client("AA:BB:CC:00:00:99", "DHCP on eth0")
        .await
        .unwrap();
    assert_eq!(registered.mac, STRANGER);
    assert!(registered.first_seen.is_some());
    assert_eq!(
        catalog.known_client(STRANGER).await.unwrap(),
        Some(registered)
    );
    assert!(catalog.boot_menu(STRANGER).await.unwrap().is_empty());
    let notes = catalog
        .client(&STRANGER.parse().unwrap())
        .await
        .unwrap()
        .notes;
    assert!(
        notes.contains("unknown-client policy register") && notes.contains("DHCP on eth0"),
        "{notes}"
    );
    let err = catalog.register_client(STRANGER, "").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");

    // Register and assign: the newcomer gets the template's menu, order and default kept,
    // and nothing of any other client's.
    catalog
        .set_unknown_client_policy(&UnknownClientPolicy::RegisterAndAssign {
            template: PC1.parse().unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(
        catalog.unknown_policy().await.unwrap(),
        UnknownPolicy::RegisterAndAssign {
            template: PC1.into()
        }
    );
    let newcomer = "aa:bb:cc:00:00:a1";
    catalog.register_client(newcomer, "").await.unwrap();
    let menu = catalog.boot_menu(newcomer).await.unwrap();
    assert_eq!(menu_names(&menu), ["ubuntu", "win11"]);
    assert!(!menu[0].is_default && menu[1].is_default);
    let session = catalog
        .open_boot_session(newcomer, "win11", None)
        .await
        .unwrap();
    assert_eq!(session.export, format!("s/{}", session.token));

    // A template removed after the policy was set registers nobody.
    let template = "aa:bb:cc:00:00:77";
    catalog
        .add_client(&client(template, "template"))
        .await
        .unwrap();
    catalog
        .set_unknown_client_policy(&UnknownClientPolicy::RegisterAndAssign {
            template: template.parse().unwrap(),
        })
        .await
        .unwrap();
    catalog
        .remove_client(&template.parse().unwrap())
        .await
        .unwrap();
    let orphan = "aa:bb:cc:00:00:a2";
    let err = catalog.register_client(orphan, "").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(template), "{err}");
    assert_eq!(catalog.known_client(orphan).await.unwrap(), None);
}

async fn leases_are_handed_out_once(catalog: &SqlCatalog) {
    use std::net::Ipv4Addr;
    let a = Ipv4Addr::new(10, 9, 0, 10);
    let b = Ipv4Addr::new(10, 9, 0, 11);
    let later = i64::MAX / 2;
    catalog.bind_lease(a, PC1, later).await.unwrap();
    // Renewing is fine; another MAC is refused while the lease runs.
    catalog
        .bind_lease(a, "AA-BB-CC-00-00-01", later)
        .await
        .unwrap();
    let err = catalog.bind_lease(a, PC2, later).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    // One lease per MAC: moving to another address ends the first.
    catalog.bind_lease(b, PC1, later).await.unwrap();
    let leases = catalog.leases(a, b).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].ip, leases[0].mac.as_str()), (b, PC1));
    // An expired lease goes to whoever asks.
    catalog.bind_lease(a, PC2, 1).await.unwrap();
    catalog.bind_lease(a, STRANGER, later).await.unwrap();
    // Releasing someone else's lease does nothing; one's own ends it.
    catalog.release_lease(b, PC2).await.unwrap();
    assert_eq!(catalog.leases(b, b).await.unwrap().len(), 1);
    catalog.release_lease(b, PC1).await.unwrap();
    assert!(catalog.leases(b, b).await.unwrap().is_empty());
    assert!(catalog.bind_lease(a, "nonsense", later).await.is_err());

    // A reserved address belongs to one client.
    let pc1 = PC1.parse().unwrap();
    let reserve = |ip: Ipv4Addr| osstream_catalog::ClientChanges {
        ip: Some(Some(ip)),
        ..Default::default()
    };
    catalog.update_client(&pc1, &reserve(a)).await.unwrap();
    let known = catalog.known_client(PC1).await.unwrap().unwrap();
    assert_eq!(known.ip, Some(a));
    let reserved = catalog.leases(a, a).await.unwrap();
    assert!(
        reserved
            .iter()
            .any(|l| l.mac == PC1 && l.expires_at == i64::MAX),
        "{reserved:?}"
    );
    let err = catalog
        .update_client(&PC2.parse().unwrap(), &reserve(a))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("already reserved"), "{err}");
}

async fn boot_directory(catalog: &SqlCatalog) {
    populate(catalog).await;
    known_clients_and_menus(catalog).await;
    no_client_sees_another_clients_vdisks(catalog).await;
    sessions_open_for_booting_clients(catalog).await;
    unknown_clients_follow_the_policy(catalog).await;
    leases_are_handed_out_once(catalog).await;
    // Protocols hold the directory as a trait object.
    let directory: &dyn BootDirectory = catalog;
    assert_eq!(
        menu_names(&directory.boot_menu(PC2).await.unwrap()),
        ["secret", "build"]
    );
}

#[tokio::test]
async fn sqlite_catalog_is_a_boot_directory() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    boot_directory(&SqlCatalog::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_catalog_is_a_boot_directory() {
    let cluster = PgCluster::start();
    boot_directory(&SqlCatalog::open(&cluster.url).await.unwrap()).await;
}
