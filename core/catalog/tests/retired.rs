//! A vdisk's image replaced under running sessions, on SQLite and PostgreSQL: sessions
//! keep the image they started on; the old image is retired until none reads it.

mod common;

use osstream_catalog::{Catalog, Client, SqlCatalog};

use common::PgCluster;

async fn swap(catalog: &SqlCatalog) {
    catalog
        .add_vdisk(&common::standard_vdisk("os"))
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for n in 1..=2 {
        let mac: osstream_catalog::Mac = format!("aa:bb:cc:00:00:0{n}").parse().unwrap();
        catalog
            .add_client(&Client {
                mac: mac.clone(),
                ip: None,
                name: None,
                hostname: None,
                group: None,
                notes: String::new(),
                first_seen: None,
                last_seen: None,
                created_at: 0,
            })
            .await
            .unwrap();
        catalog.assign(&mac, "os", false).await.unwrap();
        sessions.push(mac);
    }
    let first = catalog
        .open_session(&sessions[0], "os", None)
        .await
        .unwrap();
    assert_eq!(first.image_key.as_deref(), Some("os"));

    let old = catalog
        .replace_image("os", "os-v2", 2 << 20, Some("file:/srv/os-v2.img"))
        .await
        .unwrap();
    assert_eq!(old, "os");
    let vdisk = catalog.vdisk("os").await.unwrap();
    assert_eq!((vdisk.key.as_str(), vdisk.size), ("os-v2", 2 << 20));
    let second = catalog
        .open_session(&sessions[1], "os", None)
        .await
        .unwrap();
    assert_eq!(second.image_key.as_deref(), Some("os-v2"));
    let first = catalog.session_by_token(&first.token).await.unwrap();
    assert_eq!(
        first.image_key.as_deref(),
        Some("os"),
        "kept across the replace"
    );

    let retired = catalog.retired_images().await.unwrap();
    assert_eq!(retired.len(), 1);
    assert_eq!(
        (retired[0].key.as_str(), retired[0].vdisk.as_str()),
        ("os", "os")
    );
    assert_eq!(catalog.readers_of_retired(&retired[0]).await.unwrap(), 1);
    catalog.close_session(&first.id, "done").await.unwrap();
    assert_eq!(catalog.readers_of_retired(&retired[0]).await.unwrap(), 0);
    catalog.forget_retired(&retired[0]).await.unwrap();
    assert!(catalog.retired_images().await.unwrap().is_empty());

    // An image another vdisk also boots is never retired.
    let mut other = catalog.vdisk("os").await.unwrap();
    other.name = "other".into();
    catalog.add_vdisk(&other).await.unwrap();
    catalog
        .replace_image("os", "os-v3", 1 << 20, None)
        .await
        .unwrap();
    assert!(catalog.retired_images().await.unwrap().is_empty());
    assert!(catalog.retired_before(0).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_keeps_sessions_on_their_image_across_a_replace() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    swap(&SqlCatalog::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_keeps_sessions_on_their_image_across_a_replace() {
    let cluster = PgCluster::start();
    swap(&SqlCatalog::open(&cluster.url).await.unwrap()).await;
}
