//! Bulk import of clients (`osstream client import`): every entry of a file is checked
//! against the catalog first, and every problem is reported with its line; only a file
//! without problems is applied, in one transaction, so an import changes all or nothing.
//!
//! Importing is idempotent: an entry that already matches the catalog changes nothing, so
//! the same file imported twice leaves the second run with every client unchanged.

use std::collections::{HashMap, HashSet};

use osstream_core::{Error, ErrorKind, Result};
use serde::Serialize;
use sqlx::Row;

use crate::Catalog;
use crate::model::{Assignment, Client, Mac, validate_name};
use crate::sql::{SqlCatalog, db_error, now_ms};

/// One client as an import file describes it, with the line it starts on. A field that is
/// `None` was not in the file (left as it is); `Some(None)` was empty (cleared).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientEntry {
    /// The line of the file the entry starts on, for problems.
    pub line: usize,
    /// The MAC as written (any form [`Mac`] parses).
    pub mac: String,
    /// The client's name.
    pub name: Option<Option<String>>,
    /// Its hostname.
    pub hostname: Option<Option<String>>,
    /// Its group.
    pub group: Option<Option<String>>,
    /// The vdisks it may boot, in menu order; `None` leaves its assignments as they are.
    pub vdisks: Option<Vec<String>>,
}

/// Something wrong with one line of an import file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LineProblem {
    /// The line it is on (1 is the first).
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl LineProblem {
    /// A problem on `line`.
    pub fn new(line: usize, message: impl Into<String>) -> Self {
        LineProblem {
            line,
            message: message.into(),
        }
    }
}

/// What an import does to one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportAction {
    /// A new client.
    Created,
    /// An existing client whose fields or assignments change.
    Updated,
    /// An existing client that already matches its entry.
    Unchanged,
}

/// What an import does to one client, as `client import --json` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientImportOutcome {
    /// The entry's line in the file.
    pub line: usize,
    /// The client.
    pub mac: Mac,
    /// Created, updated or unchanged.
    pub result: ImportAction,
    /// The fields an update changes (`name`, `hostname`, `group`).
    pub changed: Vec<&'static str>,
    /// Vdisks newly assigned, in menu order.
    pub assigned: Vec<String>,
    /// Vdisks no longer assigned (only with `exact`).
    pub unassigned: Vec<String>,
}

/// A checked import: its problems, or what applying it does.
#[derive(Debug, Clone, Default)]
pub struct ClientImportPlan {
    /// Every problem found, by line; a plan with problems cannot be applied.
    pub problems: Vec<LineProblem>,
    /// One per entry without problems, in file order.
    pub outcomes: Vec<ClientImportOutcome>,
    creates: Vec<Client>,
    updates: Vec<Client>,
    /// Updated clients whose name or hostname moves: cleared first, so names may move
    /// between clients (a swap) without tripping the unique columns halfway.
    renamed: Vec<Mac>,
    unassigns: Vec<(Mac, String)>,
    assigns: Vec<Assignment>,
    /// Clients whose default vdisk was unassigned: the first vdisk left becomes it.
    new_defaults: Vec<(Mac, String)>,
}

/// A field of `current` set as the entry says, or kept.
fn apply_field(current: &Option<String>, given: &Option<Option<String>>) -> Option<String> {
    given.clone().unwrap_or_else(|| current.clone())
}

impl SqlCatalog {
    /// Every assignment, by client.
    async fn all_assignments(&self) -> Result<HashMap<Mac, Vec<Assignment>>> {
        let rows = sqlx::query("SELECT mac, vdisk, position, is_default FROM assignments ORDER BY mac, position, vdisk")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "list assignments"))?;
        let mut by_client: HashMap<Mac, Vec<Assignment>> = HashMap::new();
        for row in &rows {
            let map = |e| db_error(e, "read assignment");
            let assignment = Assignment {
                mac: row.try_get::<String, _>("mac").map_err(map)?.parse()?,
                vdisk: row.try_get("vdisk").map_err(map)?,
                position: row.try_get("position").map_err(map)?,
                is_default: row.try_get::<i64, _>("is_default").map_err(map)? != 0,
            };
            by_client
                .entry(assignment.mac.clone())
                .or_default()
                .push(assignment);
        }
        Ok(by_client)
    }

    /// Checks `entries` against the catalog and works out what importing them does.
    /// Nothing is written. With `exact`, an entry that lists vdisks also takes away the
    /// client's other vdisks; without, they are kept.
    pub async fn plan_client_import(
        &self,
        entries: &[ClientEntry],
        exact: bool,
    ) -> Result<ClientImportPlan> {
        let existing: HashMap<Mac, Client> = self
            .clients()
            .await?
            .into_iter()
            .map(|c| (c.mac.clone(), c))
            .collect();
        let vdisks: HashSet<String> = self.vdisks().await?.into_iter().map(|v| v.name).collect();
        let assignments = self.all_assignments().await?;
        let mut plan = ClientImportPlan::default();
        let mut lines: HashMap<Mac, usize> = HashMap::new();
        // Each imported client as it will be, for the uniqueness checks below.
        let mut imported: Vec<(usize, Client)> = Vec::new();
        let mut imported_macs: HashSet<Mac> = HashSet::new();

        for entry in entries {
            let problems_before = plan.problems.len();
            let mut problem =
                |message: String| plan.problems.push(LineProblem::new(entry.line, message));
            if entry.mac.trim().is_empty() {
                problem("no MAC: every client needs one, such as aa:bb:cc:dd:ee:ff".into());
                continue;
            }
            let mac: Mac = match entry.mac.parse() {
                Ok(mac) => mac,
                Err(err) => {
                    problem(err.message().to_owned());
                    continue;
                }
            };
            if let Some(first) = lines.get(&mac) {
                problem(format!(
                    "MAC {mac} is already on line {first}: give each client one entry"
                ));
                continue;
            }
            lines.insert(mac.clone(), entry.line);
            for (what, value) in [
                ("client name", &entry.name),
                ("hostname", &entry.hostname),
                ("group", &entry.group),
            ] {
                if let Some(Some(value)) = value
                    && let Err(err) = validate_name(what, value)
                {
                    problem(err.message().to_owned());
                }
            }
            let mut listed: Vec<String> = Vec::new();
            for vdisk in entry.vdisks.iter().flatten() {
                if !vdisks.contains(vdisk) {
                    problem(format!(
                        "no vdisk named {vdisk:?} (see `osstream vdisk list`; add it first or leave it out)"
                    ));
                } else if !listed.contains(vdisk) {
                    listed.push(vdisk.clone());
                }
            }
            if plan.problems.len() > problems_before {
                continue;
            }

            let current = existing.get(&mac);
            let blank = Client {
                mac: mac.clone(),
                name: None,
                hostname: None,
                group: None,
                ip: None,
                notes: String::new(),
                first_seen: None,
                last_seen: None,
                created_at: now_ms(),
            };
            let before = current.cloned().unwrap_or(blank);
            let mut after = before.clone();
            after.name = apply_field(&before.name, &entry.name);
            after.hostname = apply_field(&before.hostname, &entry.hostname);
            after.group = apply_field(&before.group, &entry.group);
            let changed: Vec<&'static str> = [
                ("name", before.name != after.name),
                ("hostname", before.hostname != after.hostname),
                ("group", before.group != after.group),
            ]
            .into_iter()
            .filter_map(|(field, differs)| differs.then_some(field))
            .collect();

            let held: &[Assignment] = assignments.get(&mac).map_or(&[], Vec::as_slice);
            let assigned: Vec<String> = listed
                .iter()
                .filter(|v| !held.iter().any(|a| &&a.vdisk == v))
                .cloned()
                .collect();
            let unassigned: Vec<String> = if exact && entry.vdisks.is_some() {
                held.iter()
                    .filter(|a| !listed.contains(&a.vdisk))
                    .map(|a| a.vdisk.clone())
                    .collect()
            } else {
                Vec::new()
            };
            // New vdisks go to the end of the menu; a client's first vdisk is its
            // default, as with `client assign`, and so is the first one left when an
            // exact import takes its default away.
            let kept: Vec<&Assignment> = held
                .iter()
                .filter(|a| !unassigned.contains(&a.vdisk))
                .collect();
            let next_position = held.iter().map(|a| a.position + 1).max().unwrap_or(0);
            let mut has_default = kept.iter().any(|a| a.is_default);
            if !has_default && !unassigned.is_empty() && !kept.is_empty() {
                plan.new_defaults.push((mac.clone(), kept[0].vdisk.clone()));
                has_default = true;
            }
            for (position, vdisk) in (next_position..).zip(&assigned) {
                plan.assigns.push(Assignment {
                    mac: mac.clone(),
                    vdisk: vdisk.clone(),
                    position,
                    is_default: !has_default,
                });
                has_default = true;
            }
            plan.unassigns
                .extend(unassigned.iter().map(|v| (mac.clone(), v.clone())));

            let result = if current.is_none() {
                plan.creates.push(after.clone());
                ImportAction::Created
            } else if !changed.is_empty() || !assigned.is_empty() || !unassigned.is_empty() {
                if !changed.is_empty() {
                    plan.updates.push(after.clone());
                }
                if before.name != after.name || before.hostname != after.hostname {
                    plan.renamed.push(mac.clone());
                }
                ImportAction::Updated
            } else {
                ImportAction::Unchanged
            };
            plan.outcomes.push(ClientImportOutcome {
                line: entry.line,
                mac: mac.clone(),
                result,
                changed: if current.is_some() {
                    changed
                } else {
                    Vec::new()
                },
                assigned,
                unassigned,
            });
            imported_macs.insert(mac);
            imported.push((entry.line, after));
        }

        // Names and hostnames are unique over the catalog as it will be: the imported
        // clients, and every other client as it is.
        for (field, value_of) in [
            (
                "client name",
                (|c: &Client| c.name.clone()) as fn(&Client) -> Option<String>,
            ),
            ("hostname", |c: &Client| c.hostname.clone()),
        ] {
            let mut owners: HashMap<String, Vec<(Option<usize>, Mac)>> = HashMap::new();
            for (line, client) in &imported {
                if let Some(value) = value_of(client) {
                    owners
                        .entry(value)
                        .or_default()
                        .push((Some(*line), client.mac.clone()));
                }
            }
            for client in existing
                .values()
                .filter(|c| !imported_macs.contains(&c.mac))
            {
                if let Some(value) = value_of(client) {
                    owners
                        .entry(value)
                        .or_default()
                        .push((None, client.mac.clone()));
                }
            }
            for (value, owners) in owners.iter().filter(|(_, o)| o.len() > 1) {
                for (line, mac) in owners {
                    let Some(line) = line else { continue };
                    let others: Vec<String> = owners
                        .iter()
                        .filter(|(_, other)| other != mac)
                        .map(|(other_line, other)| match other_line {
                            Some(l) => format!("is also given to {other} on line {l}"),
                            None => format!(
                                "is already used by {other}, which this file leaves as it is"
                            ),
                        })
                        .collect();
                    plan.problems.push(LineProblem::new(
                        *line,
                        format!(
                            "{field} {value:?} {}: {field}s are unique",
                            others.join(" and ")
                        ),
                    ));
                }
            }
        }
        plan.problems.sort();
        Ok(plan)
    }

    /// Applies a plan without problems in one transaction: all of it, or (on an error,
    /// such as the catalog changing meanwhile) none of it.
    pub async fn apply_client_import(&self, plan: &ClientImportPlan) -> Result<()> {
        if !plan.problems.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the import has {} problem(s); fix them first",
                    plan.problems.len()
                ),
            ));
        }
        let failed = |e| db_error(e, "import clients");
        let changed_meanwhile = |mac: &Mac| {
            Error::new(
                ErrorKind::Conflict,
                format!(
                    "client {mac} was removed while importing; nothing was changed: run the import again"
                ),
            )
        };
        let mut tx = self.pool.begin().await.map_err(failed)?;
        for mac in &plan.renamed {
            sqlx::query("UPDATE clients SET name = NULL, hostname = NULL WHERE mac = $1")
                .bind(mac.as_str())
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
        }
        for client in &plan.updates {
            let done = sqlx::query(
                "UPDATE clients SET name = $2, hostname = $3, client_group = $4 WHERE mac = $1",
            )
            .bind(client.mac.as_str())
            .bind(client.name.clone())
            .bind(client.hostname.clone())
            .bind(client.group.clone())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
            if done.rows_affected() != 1 {
                return Err(changed_meanwhile(&client.mac));
            }
        }
        for client in &plan.creates {
            sqlx::query(
                "INSERT INTO clients (mac, name, hostname, client_group, notes, first_seen, last_seen, created_at, ip) \
                 VALUES ($1, $2, $3, $4, '', NULL, NULL, $5, NULL)",
            )
            .bind(client.mac.as_str())
            .bind(client.name.clone())
            .bind(client.hostname.clone())
            .bind(client.group.clone())
            .bind(client.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, &format!("import client {}", client.mac)))?;
        }
        for (mac, vdisk) in &plan.unassigns {
            sqlx::query("DELETE FROM assignments WHERE mac = $1 AND vdisk = $2")
                .bind(mac.as_str())
                .bind(vdisk)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
        }
        for (mac, vdisk) in &plan.new_defaults {
            sqlx::query("UPDATE assignments SET is_default = 1 WHERE mac = $1 AND vdisk = $2")
                .bind(mac.as_str())
                .bind(vdisk)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
        }
        for assignment in &plan.assigns {
            sqlx::query(
                "INSERT INTO assignments (mac, vdisk, position, is_default) VALUES ($1, $2, $3, $4)",
            )
            .bind(assignment.mac.as_str())
            .bind(&assignment.vdisk)
            .bind(assignment.position)
            .bind(i64::from(assignment.is_default))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                db_error(
                    e,
                    &format!("assign vdisk {:?} to {}", assignment.vdisk, assignment.mac),
                )
            })?;
        }
        tx.commit().await.map_err(failed)
    }
}
