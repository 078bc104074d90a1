//! Bulk client import on SQLite and PostgreSQL: all or nothing, idempotent, names may
//! move between clients, `exact` takes unlisted vdisks away.

mod common;

use osstream_catalog::{Catalog, ClientEntry, ImportAction, Mac, SqlCatalog};

use common::PgCluster;

fn entry(line: usize, mac: &str, name: &str, vdisks: &[&str]) -> ClientEntry {
    ClientEntry {
        line,
        mac: mac.into(),
        name: Some(Some(name.into())),
        hostname: Some(Some(format!("host-{name}"))),
        group: Some(Some("lab".into())),
        vdisks: Some(vdisks.iter().map(|v| v.to_string()).collect()),
    }
}

fn actions(plan: &osstream_catalog::ClientImportPlan) -> Vec<ImportAction> {
    plan.outcomes.iter().map(|o| o.result).collect()
}

async fn vdisks_of(catalog: &SqlCatalog, mac: &str) -> Vec<(String, bool)> {
    let mac: Mac = mac.parse().unwrap();
    catalog
        .assignments(&mac)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.vdisk, a.is_default))
        .collect()
}

async fn import(catalog: &SqlCatalog) {
    for name in ["win11", "debian"] {
        catalog
            .add_vdisk(&common::standard_vdisk(name))
            .await
            .unwrap();
    }
    let entries = vec![
        entry(2, "aa:bb:cc:00:00:01", "pc1", &["win11", "debian"]),
        entry(3, "AA-BB-CC-00-00-02", "pc2", &["debian"]),
    ];
    let plan = catalog.plan_client_import(&entries, false).await.unwrap();
    assert_eq!(plan.problems, []);
    assert_eq!(actions(&plan), [ImportAction::Created; 2]);
    catalog.apply_client_import(&plan).await.unwrap();
    assert_eq!(
        vdisks_of(catalog, "aa:bb:cc:00:00:01").await,
        [("win11".into(), true), ("debian".into(), false)]
    );

    // The same entries again: nothing to do.
    let again = catalog.plan_client_import(&entries, false).await.unwrap();
    assert_eq!(actions(&again), [ImportAction::Unchanged; 2]);

    // Names swap between the two clients; pc1 keeps win11 unless exact.
    let swapped = vec![
        entry(2, "aa:bb:cc:00:00:01", "pc2", &["debian"]),
        entry(3, "aa:bb:cc:00:00:02", "pc1", &["debian"]),
    ];
    let plan = catalog.plan_client_import(&swapped, false).await.unwrap();
    assert_eq!(plan.problems, []);
    assert_eq!(plan.outcomes[0].changed, ["name", "hostname"]);
    catalog.apply_client_import(&plan).await.unwrap();
    let first: Mac = "aa:bb:cc:00:00:01".parse().unwrap();
    assert_eq!(
        catalog.client(&first).await.unwrap().name.as_deref(),
        Some("pc2")
    );
    assert_eq!(vdisks_of(catalog, "aa:bb:cc:00:00:01").await.len(), 2);
    let exact = catalog.plan_client_import(&swapped, true).await.unwrap();
    assert_eq!(exact.outcomes[0].unassigned, ["win11"]);
    assert_eq!(
        actions(&exact),
        [ImportAction::Updated, ImportAction::Unchanged]
    );
    catalog.apply_client_import(&exact).await.unwrap();
    // Its default went with win11: the vdisk left is the default now.
    assert_eq!(
        vdisks_of(catalog, "aa:bb:cc:00:00:01").await,
        [("debian".into(), true)]
    );

    // Every problem, by line; nothing applied.
    let bad = vec![
        entry(2, "aa:bb:cc:00:00:03", "pc1", &[]),
        entry(3, "aa:bb:cc:00:00:04", "pc4", &["ghost"]),
        entry(4, "aa:bb:cc:00:00:04", "pc5", &[]),
        entry(5, "not-a-mac", "pc6", &[]),
    ];
    let plan = catalog.plan_client_import(&bad, false).await.unwrap();
    let lines: Vec<usize> = plan.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, [2, 2, 3, 4, 5], "{:#?}", plan.problems);
    assert!(
        plan.problems[0]
            .message
            .contains("is already used by aa:bb:cc:00:00:02"),
        "{:?}",
        plan.problems[0]
    );
    assert!(
        plan.problems[1]
            .message
            .starts_with("hostname \"host-pc1\"")
    );
    assert!(
        plan.problems[2]
            .message
            .contains("no vdisk named \"ghost\"")
    );
    assert!(plan.problems[3].message.contains("already on line 3"));
    assert!(plan.problems[4].message.contains("invalid MAC address"));
    assert!(catalog.apply_client_import(&plan).await.is_err());
    assert_eq!(catalog.clients().await.unwrap().len(), 2);
}

#[tokio::test]
async fn sqlite_imports_clients_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    import(&SqlCatalog::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_imports_clients_all_or_nothing() {
    let cluster = PgCluster::start();
    import(&SqlCatalog::open(&cluster.url).await.unwrap()).await;
}
