//! The typed calls: one per operation of the API, named after its `operationId`.

use api::wire::{
    ActionRequest, AttachRequest, Disk, DiskCreate, DiskFormat, DiskPatch, Image, ImageCreate,
    ImageKind, Instance, InstanceCreate, InstancePatch, Operation,
};
use api::ServerInfoResponse;
use hyper::header::{ETAG, IF_MATCH};
use hyper::Method;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::body::Body;
use crate::connection::Client;
use crate::error::Error;
use crate::request::{Reply, Streamed};

/// A resource with its `ETag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tagged<T> {
    /// The resource.
    pub value: T,
    /// Its entity tag, for `If-Match`.
    pub etag: String,
}

/// Percent-encodes a path segment or a query value (names and ids are plain, but a user may
/// type anything).
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn instance(key: &str) -> String {
    format!("/v1/instances/{}", escape(key))
}

fn disk(key: &str) -> String {
    format!("/v1/disks/{}", escape(key))
}

fn image(key: &str) -> String {
    format!("/v1/images/{}", escape(key))
}

pub(crate) fn tagged<T: DeserializeOwned>(reply: Reply) -> Result<Tagged<T>, Error> {
    let etag = reply.header(ETAG.as_str()).unwrap_or_default().to_string();
    Ok(Tagged {
        value: reply.json()?,
        etag,
    })
}

impl Client {
    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.request(Method::GET, path)
            .send()
            .await?
            .success()?
            .json()
    }

    /// Every item of a list, following `x-next-page-token` when the server pages it.
    async fn list<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, Error> {
        self.list_query(path, "").await
    }

    /// Every item of a list with a query (`a=1&b=2`, or empty), following
    /// `x-next-page-token` when the server pages it.
    async fn list_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &str,
    ) -> Result<Vec<T>, Error> {
        let mut items = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut q: Vec<String> = Vec::new();
            if !query.is_empty() {
                q.push(query.to_string());
            }
            if let Some(t) = &page {
                q.push(format!("page_token={}", escape(t)));
            }
            let p = match q.is_empty() {
                true => path.to_string(),
                false => format!("{path}?{}", q.join("&")),
            };
            let reply = self.request(Method::GET, p).send().await?.success()?;
            let next = reply.header("x-next-page-token").map(String::from);
            items.extend(reply.json::<Vec<T>>()?);
            match next {
                Some(t) if !t.is_empty() && page.as_deref() != Some(t.as_str()) => page = Some(t),
                _ => return Ok(items),
            }
        }
    }

    async fn delete(&self, path: &str) -> Result<(), Error> {
        self.request(Method::DELETE, path).send().await?.success()?;
        Ok(())
    }

    /// `GET /v1`: the server and its host.
    pub async fn server_info(&self) -> Result<ServerInfoResponse, Error> {
        self.get("/v1").await
    }

    /// `GET /v1/openapi.json`: the OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, Error> {
        self.get("/v1/openapi.json").await
    }

    /// `GET /metrics`: the OpenMetrics text.
    pub async fn metrics(&self) -> Result<String, Error> {
        Ok(self
            .request(Method::GET, "/metrics")
            .send()
            .await?
            .success()?
            .text())
    }

    /// Every instance, oldest first.
    pub async fn instance_list(&self) -> Result<Vec<Instance>, Error> {
        self.list("/v1/instances").await
    }

    /// Creates an instance (and starts it with `start`).
    pub async fn instance_create(&self, spec: &InstanceCreate) -> Result<Tagged<Instance>, Error> {
        let reply = self
            .request(Method::POST, "/v1/instances")
            .json(spec)
            .send()
            .await?
            .success()?;
        tagged(reply)
    }

    /// One instance, by id or name.
    pub async fn instance_get(&self, key: &str) -> Result<Tagged<Instance>, Error> {
        tagged(
            self.request(Method::GET, instance(key))
                .send()
                .await?
                .success()?,
        )
    }

    /// Changes an instance; with `if_match`, only if its `ETag` is still that one.
    pub async fn instance_update(
        &self,
        key: &str,
        patch: &InstancePatch,
        if_match: Option<&str>,
    ) -> Result<Tagged<Instance>, Error> {
        let mut req = self.request(Method::PATCH, instance(key)).json(patch);
        if let Some(tag) = if_match {
            req = req.header(IF_MATCH.as_str(), tag);
        }
        tagged(req.send().await?.success()?)
    }

    /// Deletes an instance; `force` hard-stops a running one first.
    pub async fn instance_delete(&self, key: &str, force: bool) -> Result<(), Error> {
        self.delete(&format!("{}?force={force}", instance(key)))
            .await
    }

    /// Starts an action; answers its operation at once.
    pub async fn instance_action(
        &self,
        key: &str,
        action: &ActionRequest,
    ) -> Result<Operation, Error> {
        self.request(Method::POST, format!("{}/actions", instance(key)))
            .json(action)
            .send()
            .await?
            .success()?
            .json()
    }

    /// Runs an action to its end (`?wait=true`); answers the instance then.
    pub async fn instance_action_wait(
        &self,
        key: &str,
        action: &ActionRequest,
    ) -> Result<Instance, Error> {
        self.request(Method::POST, format!("{}/actions?wait=true", instance(key)))
            .json(action)
            .send()
            .await?
            .success()?
            .json()
    }

    /// Attaches a disk to a stopped instance.
    pub async fn instance_disk_attach(
        &self,
        key: &str,
        attach: &AttachRequest,
    ) -> Result<Tagged<Instance>, Error> {
        let reply = self
            .request(Method::POST, format!("{}/disks", instance(key)))
            .json(attach)
            .send()
            .await?
            .success()?;
        tagged(reply)
    }

    /// Detaches a disk from a stopped instance.
    pub async fn instance_disk_detach(
        &self,
        key: &str,
        disk: &str,
    ) -> Result<Tagged<Instance>, Error> {
        let path = format!("{}/disks/{}", instance(key), escape(disk));
        tagged(self.request(Method::DELETE, path).send().await?.success()?)
    }

    /// The recent operations, oldest first.
    pub async fn operation_list(&self) -> Result<Vec<Operation>, Error> {
        self.list("/v1/operations").await
    }

    /// The recent operations, oldest first: only those on `instance` (name or id) when
    /// given; only the first `limit` of them when given, else every page.
    pub async fn operation_list_of(
        &self,
        instance: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<Operation>, Error> {
        let mut query = Vec::new();
        if let Some(i) = instance {
            query.push(format!("instance={}", escape(i)));
        }
        match limit {
            Some(l) => {
                query.push(format!("limit={l}"));
                self.get(&format!("/v1/operations?{}", query.join("&")))
                    .await
            }
            None => self.list_query("/v1/operations", &query.join("&")).await,
        }
    }

    /// One operation.
    pub async fn operation_get(&self, id: Uuid) -> Result<Operation, Error> {
        self.get(&format!("/v1/operations/{id}")).await
    }

    /// Waits until an operation has ended, at most `timeout_s` seconds; answers it then.
    pub async fn operation_wait(&self, id: Uuid, timeout_s: u64) -> Result<Operation, Error> {
        self.get(&format!("/v1/operations/{id}/wait?timeout_s={timeout_s}"))
            .await
    }

    /// The server-sent events after `since` (from now on without it), as they come.
    pub async fn event_stream(&self, since: Option<u64>) -> Result<Streamed, Error> {
        let path = match since {
            Some(s) => format!("/v1/events?since={s}"),
            None => "/v1/events".to_string(),
        };
        self.request(Method::GET, path).stream().await
    }

    /// The events kept after `since` (server-sent events), then the end of the stream.
    pub async fn event_history(&self, since: u64) -> Result<Streamed, Error> {
        self.request(
            Method::GET,
            format!("/v1/events?since={since}&follow=false"),
        )
        .stream()
        .await
    }

    /// Every disk, oldest first.
    pub async fn disk_list(&self) -> Result<Vec<Disk>, Error> {
        self.list("/v1/disks").await
    }

    /// Creates a disk.
    pub async fn disk_create(&self, spec: &DiskCreate) -> Result<Tagged<Disk>, Error> {
        let reply = self
            .request(Method::POST, "/v1/disks")
            .json(spec)
            .send()
            .await?
            .success()?;
        tagged(reply)
    }

    /// One disk, by id or name.
    pub async fn disk_get(&self, key: &str) -> Result<Tagged<Disk>, Error> {
        tagged(
            self.request(Method::GET, disk(key))
                .send()
                .await?
                .success()?,
        )
    }

    /// Changes a disk; with `if_match`, only if its `ETag` is still that one.
    pub async fn disk_update(
        &self,
        key: &str,
        patch: &DiskPatch,
        if_match: Option<&str>,
    ) -> Result<Tagged<Disk>, Error> {
        let mut req = self.request(Method::PATCH, disk(key)).json(patch);
        if let Some(tag) = if_match {
            req = req.header(IF_MATCH.as_str(), tag);
        }
        tagged(req.send().await?.success()?)
    }

    /// Deletes a detached disk.
    pub async fn disk_delete(&self, key: &str) -> Result<(), Error> {
        self.delete(&disk(key)).await
    }

    /// Creates a disk named `name`, stored in `format`, from `body` (a raw or qcow2 image,
    /// streamed: see [`crate::body::file`]).
    pub async fn disk_import(
        &self,
        name: &str,
        format: Option<DiskFormat>,
        body: Body,
        len: Option<u64>,
    ) -> Result<Tagged<Disk>, Error> {
        let mut path = format!("/v1/disks/import?name={}", escape(name));
        if let Some(f) = format {
            path.push_str(&format!("&format={}", format_name(f)));
        }
        let mut req = self.request(Method::POST, path);
        if let Some(len) = len {
            req = req.header("content-length", &len.to_string());
        }
        let reply = req
            .body("application/octet-stream", body)
            .send()
            .await?
            .success()?;
        tagged(reply)
    }

    /// A disk's content in `format` (raw by default), as it comes.
    pub async fn disk_export(
        &self,
        key: &str,
        format: Option<DiskFormat>,
    ) -> Result<Streamed, Error> {
        let mut path = format!("{}/export", disk(key));
        if let Some(f) = format {
            path.push_str(&format!("?format={}", format_name(f)));
        }
        self.request(Method::GET, path).stream().await
    }

    /// Every image, `kiln-probe` first.
    pub async fn image_list(&self) -> Result<Vec<Image>, Error> {
        self.list("/v1/images").await
    }

    /// Registers a file of the server's image directories.
    pub async fn image_create(&self, spec: &ImageCreate) -> Result<Image, Error> {
        self.request(Method::POST, "/v1/images")
            .json(spec)
            .send()
            .await?
            .success()?
            .json()
    }

    /// Registers an image of `kind` named `name` from `body` (streamed).
    pub async fn image_upload(
        &self,
        name: &str,
        kind: ImageKind,
        body: Body,
        len: Option<u64>,
    ) -> Result<Image, Error> {
        let kind = serde_json::to_value(kind).unwrap_or_default();
        let path = format!(
            "/v1/images/upload?name={}&kind={}",
            escape(name),
            kind.as_str().unwrap_or_default()
        );
        let mut req = self.request(Method::POST, path);
        if let Some(len) = len {
            req = req.header("content-length", &len.to_string());
        }
        req.body("application/octet-stream", body)
            .send()
            .await?
            .success()?
            .json()
    }

    /// One image, by id or name.
    pub async fn image_get(&self, key: &str) -> Result<Image, Error> {
        self.get(&image(key)).await
    }

    /// Deletes an image.
    pub async fn image_delete(&self, key: &str) -> Result<(), Error> {
        self.delete(&image(key)).await
    }
}

/// A format as the query spells it.
fn format_name(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(escape("web-1"), "web-1");
        assert_eq!(escape("a b/c?"), "a%20b%2Fc%3F");
    }

    #[test]
    fn format_names_are_the_wires() {
        for f in [DiskFormat::Raw, DiskFormat::Qcow2] {
            assert_eq!(serde_json::to_value(f).unwrap(), format_name(f));
        }
    }
}
