//! `kiln snapshot …`: instance snapshots, instances restored or cloned from them, and disk
//! snapshots, through a running `kiln serve`.

use clap::Subcommand;
use client::wire::{
    ImageCreate, ImageKind, ImageSourceSpec, InstanceRestore, RestoreSource, SnapshotCreate,
};
use serde_json::Value;

use crate::endpoint::{Endpoint, Failed};
use crate::table;

/// `kiln snapshot …`
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running instance: memory, machine state, disks and console history.
    ///
    /// The guest is paused meanwhile, then resumes (or is stopped with --stop).
    Create {
        /// Instance name or id.
        instance: String,
        /// The snapshot's name (a-z, 0-9, '-').
        name: String,
        /// Leave the instance stopped afterwards.
        #[arg(long)]
        stop: bool,
    },
    /// List instance snapshots.
    List,
    /// Show one instance snapshot.
    Show {
        /// Name or id.
        name: String,
    },
    /// Delete an instance snapshot (no disk may be made from it any more).
    Delete {
        /// Name or id.
        name: String,
    },
    /// Create an instance from a snapshot; its first start continues the guest where the
    /// snapshot paused it. With --count, that many clones named NAME-1 … NAME-N.
    Restore {
        /// Snapshot name or id.
        snapshot: String,
        /// The new instance's name (with --count, the prefix).
        name: String,
        /// Make this many clones (memory shared copy-on-write, own disks and MACs).
        #[arg(long)]
        count: Option<u32>,
        /// Give a single restored instance fresh MACs (clones always get them).
        #[arg(long)]
        fresh_mac: bool,
        /// Start (restore) it right away.
        #[arg(long)]
        start: bool,
    },
    /// Disk snapshots: create, list, delete, roll back.
    #[command(subcommand)]
    Disk(DiskSnapshotCommand),
}

/// `kiln snapshot disk …`
#[derive(Subcommand)]
pub enum DiskSnapshotCommand {
    /// Snapshot a disk, also while its instance runs (crash-consistent).
    Create {
        /// Disk name or id.
        disk: String,
        /// The snapshot's name.
        name: String,
    },
    /// List a disk's snapshots.
    List {
        /// Disk name or id.
        disk: String,
    },
    /// Delete a disk's snapshot (its instance must not run).
    Delete {
        /// Disk name or id.
        disk: String,
        /// The snapshot's name.
        name: String,
    },
    /// Roll a disk back to a snapshot (detached, or its instance stopped).
    Rollback {
        /// Disk name or id.
        disk: String,
        /// The snapshot's name.
        name: String,
    },
    /// Make a disk image from a disk's snapshot (detached, or its instance stopped), stored by
    /// the server; disks can then be made from the image.
    Image {
        /// Disk name or id.
        disk: String,
        /// The snapshot's name.
        name: String,
        /// The new image's name (a-z, 0-9, '-').
        image: String,
    },
}

/// Runs `kiln snapshot …`; returns the exit status.
pub fn snapshot(ep: Endpoint, cmd: SnapshotCommand) -> i32 {
    ep.run(|ep, c| async move { command(&ep, &c, cmd).await })
}

async fn command(ep: &Endpoint, c: &client::Client, cmd: SnapshotCommand) -> Result<(), Failed> {
    match cmd {
        SnapshotCommand::Create {
            instance,
            name,
            stop,
        } => {
            let spec = SnapshotCreate {
                name,
                description: String::new(),
                stop,
            };
            ep.show(
                &c.instance_snapshot_create(&instance, &spec).await?,
                snapshots,
            );
        }
        SnapshotCommand::List => ep.show(&c.snapshot_list().await?, snapshots),
        SnapshotCommand::Show { name } => ep.show(&c.snapshot_get(&name).await?, snapshots),
        SnapshotCommand::Delete { name } => c.snapshot_delete(&name).await?,
        SnapshotCommand::Restore {
            snapshot,
            name,
            count,
            fresh_mac,
            start,
        } => {
            let spec = InstanceRestore {
                name,
                description: String::new(),
                source: RestoreSource { snapshot },
                count,
                fresh_mac,
                network_interfaces: Vec::new(),
                auto_start: false,
                start,
            };
            ep.show(&c.instance_restore(&spec).await?, table::instances);
        }
        SnapshotCommand::Disk(cmd) => match cmd {
            DiskSnapshotCommand::Create { disk, name } => {
                ep.show(&c.disk_snapshot_create(&disk, &name).await?, disk_snapshots)
            }
            DiskSnapshotCommand::List { disk } => {
                ep.show(&c.disk_snapshot_list(&disk).await?, disk_snapshots)
            }
            DiskSnapshotCommand::Delete { disk, name } => {
                c.disk_snapshot_delete(&disk, &name).await?
            }
            DiskSnapshotCommand::Rollback { disk, name } => ep.show(
                &c.disk_snapshot_rollback(&disk, &name).await?.value,
                table::disks,
            ),
            DiskSnapshotCommand::Image { disk, name, image } => {
                let spec = ImageCreate {
                    name: image,
                    kind: ImageKind::Disk,
                    path: None,
                    source: Some(ImageSourceSpec::Snapshot {
                        disk,
                        snapshot: name,
                    }),
                    description: String::new(),
                };
                ep.show(&c.image_create(&spec).await?, table::images)
            }
        },
    }
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), String::from)
}

/// Instance snapshots: name, instance, memory saved, pause, space used, id.
fn snapshots(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                text(&s["name"]),
                text(&s["instance_name"]),
                table::size(&s["memory"]),
                table::size(&s["memory_saved"]),
                format!("{} us", s["paused_us"]),
                table::size(&s["actual_size"]),
                text(&s["id"]),
            ]
        })
        .collect();
    table::print(
        &[
            "NAME", "INSTANCE", ">MEMORY", ">SAVED", ">PAUSED", ">ACTUAL", "ID",
        ],
        &rows,
    );
}

/// Disk snapshots: disk, name, size, when.
fn disk_snapshots(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                text(&s["disk"]),
                text(&s["name"]),
                table::size(&s["size"]),
                text(&s["created_at"]),
            ]
        })
        .collect();
    table::print(&["DISK", "NAME", ">SIZE", "CREATED"], &rows);
}
