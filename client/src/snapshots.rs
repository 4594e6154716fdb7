//! The typed calls on snapshots: instance snapshots, disk snapshots, and instances restored
//! or cloned from a snapshot. Named after their `operationId`s.

use api::wire::{
    CreatedInstances, Disk, DiskSnapshot, DiskSnapshotCreate, Instance, InstanceRestore, Snapshot,
    SnapshotCreate,
};
use hyper::Method;

use crate::calls::{escape, Tagged};
use crate::connection::Client;
use crate::error::Error;

fn disk_snapshots(disk: &str) -> String {
    format!("/v1/disks/{}/snapshots", escape(disk))
}

impl Client {
    /// Takes a snapshot of a running or paused instance (`stop`: leaves it stopped).
    pub async fn instance_snapshot_create(
        &self,
        instance: &str,
        spec: &SnapshotCreate,
    ) -> Result<Snapshot, Error> {
        self.request(
            Method::POST,
            format!("/v1/instances/{}/snapshots", escape(instance)),
        )
        .json(spec)
        .send()
        .await?
        .success()?
        .json()
    }

    /// Every instance snapshot, oldest first.
    pub async fn snapshot_list(&self) -> Result<Vec<Snapshot>, Error> {
        self.request(Method::GET, "/v1/snapshots")
            .send()
            .await?
            .success()?
            .json()
    }

    /// One instance snapshot, by name or id.
    pub async fn snapshot_get(&self, key: &str) -> Result<Snapshot, Error> {
        self.request(Method::GET, format!("/v1/snapshots/{}", escape(key)))
            .send()
            .await?
            .success()?
            .json()
    }

    /// Deletes an instance snapshot.
    pub async fn snapshot_delete(&self, key: &str) -> Result<(), Error> {
        self.request(Method::DELETE, format!("/v1/snapshots/{}", escape(key)))
            .send()
            .await?
            .success()?;
        Ok(())
    }

    /// Creates instances from a snapshot (`POST /v1/instances` with a `source`): the one
    /// restored instance, or the clones with `count`.
    pub async fn instance_restore(&self, spec: &InstanceRestore) -> Result<Vec<Instance>, Error> {
        let made: CreatedInstances = self
            .request(Method::POST, "/v1/instances")
            .json(spec)
            .send()
            .await?
            .success()?
            .json()?;
        Ok(match made {
            CreatedInstances::One(i) => vec![*i],
            CreatedInstances::Many(all) => all,
        })
    }

    /// Takes a snapshot of a disk (also while its instance runs).
    pub async fn disk_snapshot_create(
        &self,
        disk: &str,
        name: &str,
    ) -> Result<DiskSnapshot, Error> {
        self.request(Method::POST, disk_snapshots(disk))
            .json(&DiskSnapshotCreate { name: name.into() })
            .send()
            .await?
            .success()?
            .json()
    }

    /// The snapshots of a disk, oldest first.
    pub async fn disk_snapshot_list(&self, disk: &str) -> Result<Vec<DiskSnapshot>, Error> {
        self.request(Method::GET, disk_snapshots(disk))
            .send()
            .await?
            .success()?
            .json()
    }

    /// One snapshot of a disk.
    pub async fn disk_snapshot_get(&self, disk: &str, name: &str) -> Result<DiskSnapshot, Error> {
        let path = format!("{}/{}", disk_snapshots(disk), escape(name));
        self.request(Method::GET, path)
            .send()
            .await?
            .success()?
            .json()
    }

    /// Deletes a snapshot of a disk.
    pub async fn disk_snapshot_delete(&self, disk: &str, name: &str) -> Result<(), Error> {
        let path = format!("{}/{}", disk_snapshots(disk), escape(name));
        self.request(Method::DELETE, path).send().await?.success()?;
        Ok(())
    }

    /// Rolls a disk back to one of its snapshots (detached, or its instance stopped).
    pub async fn disk_snapshot_rollback(
        &self,
        disk: &str,
        name: &str,
    ) -> Result<Tagged<Disk>, Error> {
        let path = format!("{}/{}/rollback", disk_snapshots(disk), escape(name));
        let reply = self.request(Method::POST, path).send().await?.success()?;
        crate::calls::tagged(reply)
    }
}
