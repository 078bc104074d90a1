//! Boot profiles in the catalog, on SQLite and on PostgreSQL: merged per boot, replaced
//! by a new image generation, imported, cleared, gone with their vdisk, and no boot lost
//! when several are merged at once.

mod common;

use osstream_catalog::{Catalog, SqlCatalog};
use osstream_core::{BootProfile, ErrorKind, ProfileStore, RecordedBoot};

use common::PgCluster;

fn vdisk(name: &str) -> osstream_catalog::Vdisk {
    common::standard_vdisk(name)
}

fn boot(vdisk: &str, generation: &str, touched: &[u64]) -> RecordedBoot {
    RecordedBoot {
        vdisk: vdisk.into(),
        image: format!("file:/srv/{vdisk}.img"),
        generation: generation.into(),
        block_size: 65536,
        touched: touched.to_vec(),
    }
}

async fn profiles(catalog: &SqlCatalog) {
    catalog.add_vdisk(&vdisk("deb")).await.unwrap();
    catalog.add_vdisk(&vdisk("win")).await.unwrap();
    assert!(catalog.profile("deb").await.unwrap().is_none());

    let first = catalog
        .record_boot(&boot("deb", "g1", &[5, 1, 2]))
        .await
        .unwrap();
    assert_eq!(first.boots, 1);
    catalog
        .record_boot(&boot("deb", "g1", &[5, 1, 2, 9]))
        .await
        .unwrap();
    let stored = catalog.profile("deb").await.unwrap().unwrap();
    assert_eq!(stored.boots, 2);
    assert_eq!(stored.boot_set().collect::<Vec<_>>(), vec![5, 1, 2, 9]);

    // A new generation starts over.
    catalog.record_boot(&boot("deb", "g2", &[7])).await.unwrap();
    let stored = catalog.profile("deb").await.unwrap().unwrap();
    assert_eq!((stored.generation.as_str(), stored.boots), ("g2", 1));

    // Boots merged at once are all kept.
    let mut running = Vec::new();
    for _ in 0..8 {
        let catalog = catalog.clone();
        running.push(tokio::spawn(async move {
            catalog.record_boot(&boot("win", "w1", &[1, 2, 3])).await
        }));
    }
    for task in running {
        task.await.unwrap().unwrap();
    }
    assert_eq!(catalog.profile("win").await.unwrap().unwrap().boots, 8);

    // Import replaces; clear removes; an unknown vdisk is named.
    let mut imported = BootProfile::new("win", "s3:b/win.img", "etag1", 65536);
    imported.merge_boot(&[4, 4, 5]);
    catalog.put_profile(&imported).await.unwrap();
    assert_eq!(catalog.profile("win").await.unwrap().unwrap(), imported);
    assert!(catalog.clear_profile("win").await.unwrap());
    assert!(!catalog.clear_profile("win").await.unwrap());
    let err = catalog
        .record_boot(&boot("nope", "g1", &[1]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    // A removed vdisk takes its profile along; a new one of that name starts empty.
    catalog.remove_vdisk("deb", false).await.unwrap();
    catalog.add_vdisk(&vdisk("deb")).await.unwrap();
    assert!(catalog.profile("deb").await.unwrap().is_none());
}

#[tokio::test]
async fn sqlite_keeps_boot_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    profiles(&SqlCatalog::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_keeps_boot_profiles() {
    let cluster = PgCluster::start();
    profiles(&SqlCatalog::open(&cluster.url).await.unwrap()).await;
}
