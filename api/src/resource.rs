//! Resources as the API names them: their paths (`/v1/instances/{id}`), their ETags (the
//! control plane's revisions) and the `If-Match` header that names one.

use axum::http::{header, HeaderMap};
use control::{Revision, Subject};
use uuid::Uuid;

/// The path of an instance.
pub fn instance_path(id: Uuid) -> String {
    format!("/v1/instances/{id}")
}

/// The path of a disk.
pub fn disk_path(id: Uuid) -> String {
    format!("/v1/disks/{id}")
}

/// The path of an image.
pub fn image_path(id: Uuid) -> String {
    format!("/v1/images/{id}")
}

/// The path of an operation.
pub fn operation_path(id: Uuid) -> String {
    format!("/v1/operations/{id}")
}

/// The path of what an event is about.
pub fn subject_path(subject: Subject) -> String {
    match subject {
        Subject::InstanceState(id) | Subject::InstanceUpdated(id) => instance_path(id),
        Subject::Disk(id) => disk_path(id),
        Subject::Image(id) => image_path(id),
        Subject::Operation(id) => operation_path(id),
    }
}

/// The entity tag of a revision: `"<id without dashes>-<generation>"`.
pub fn etag(rev: Revision) -> String {
    format!("\"{}-{}\"", rev.id.simple(), rev.generation)
}

/// The revision an `If-Match` header names: none without the header or with `*`; a tag this
/// server did not make names a revision no definition has (so that it never matches).
pub fn if_match(headers: &HeaderMap) -> Option<Revision> {
    let tag = headers.get(header::IF_MATCH)?.to_str().unwrap_or("").trim();
    if tag == "*" {
        return None;
    }
    let parsed = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .and_then(|t| t.split_once('-'))
        .and_then(|(id, generation)| {
            // A GET's tag has the body's hash after a dot (crate::conditional).
            let generation = generation.split('.').next().unwrap_or(generation);
            Some(Revision {
                id: Uuid::try_parse(id).ok()?,
                generation: generation.parse().ok()?,
            })
        });
    Some(parsed.unwrap_or(Revision {
        id: Uuid::nil(),
        generation: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_round_trip_through_if_match() {
        let rev = Revision {
            id: Uuid::new_v4(),
            generation: 7,
        };
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h), None);
        h.insert(header::IF_MATCH, etag(rev).parse().unwrap());
        assert_eq!(if_match(&h), Some(rev));
        let of_a_get = format!("{}.00ff00ff00ff00ff\"", etag(rev).trim_end_matches('"'));
        h.insert(header::IF_MATCH, of_a_get.parse().unwrap());
        assert_eq!(if_match(&h), Some(rev), "the revision in a GET's tag");
        h.insert(header::IF_MATCH, "*".parse().unwrap());
        assert_eq!(if_match(&h), None);
        h.insert(header::IF_MATCH, "\"junk\"".parse().unwrap());
        assert_eq!(if_match(&h).unwrap().id, Uuid::nil());
    }
}
