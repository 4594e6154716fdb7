//! Bearer-token authentication of the TCP listener: every request needs
//! `Authorization: Bearer <token>`, checked in constant time before anything else (the body
//! included) is read.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::request_id::RequestId;

/// The secret a TCP client must present. Its `Debug` output does not show it.
#[derive(Clone)]
pub struct BearerToken(Arc<[u8]>);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Everyone may read the token file: the token is no secret.
    #[error("token file {path} is readable by everyone (mode {mode:o}); chmod o-rwx it")]
    WorldReadable {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The token is empty (or only whitespace).
    #[error("token file {path} is empty")]
    Empty {
        /// The file.
        path: String,
    },
    /// The token has characters an HTTP header cannot carry.
    #[error("token in {path} has characters that are not visible ASCII")]
    NotPrintable {
        /// The file.
        path: String,
    },
}

impl BearerToken {
    /// Reads the token from `path`: the file's content without surrounding whitespace. It must
    /// be non-empty visible ASCII, and the file not readable by everyone.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read = |source| TokenError::Read {
            path: shown.clone(),
            source,
        };
        let text = std::fs::read(path).map_err(read)?;
        let token = Self::from_bytes(text.trim_ascii(), &shown)?;
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o7777;
        if mode & 0o004 != 0 {
            return Err(TokenError::WorldReadable { path: shown, mode });
        }
        Ok(token)
    }

    /// A token from text (surrounding whitespace removed), with the rules of
    /// [`BearerToken::from_file`].
    pub fn new(token: &str) -> Result<Self, TokenError> {
        Self::from_bytes(token.as_bytes().trim_ascii(), "(given)")
    }

    fn from_bytes(token: &[u8], path: &str) -> Result<Self, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty {
                path: path.to_string(),
            });
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable {
                path: path.to_string(),
            });
        }
        Ok(Self(token.into()))
    }

    /// Whether an `Authorization` header value presents this token (`Bearer <token>`, the
    /// scheme in any case). The token bytes are compared in constant time.
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        const SCHEME: &[u8] = b"bearer ";
        if authorization.len() <= SCHEME.len()
            || !authorization[..SCHEME.len()].eq_ignore_ascii_case(SCHEME)
        {
            return false;
        }
        let presented = authorization[SCHEME.len()..].trim_ascii();
        bool::from(presented.ct_eq(&self.0))
    }
}

/// Middleware: 401 `unauthorized` unless the request presents the token.
pub(crate) async fn require(
    State(token): State<BearerToken>,
    req: Request,
    next: Next,
) -> Response {
    let mut presented = req.headers().get_all(header::AUTHORIZATION).iter();
    let error = match (presented.next(), presented.next()) {
        (None, _) => ApiError::unauthorized("missing `Authorization: Bearer <token>` header"),
        // Proxies and servers disagree on which of several to take: refuse them all.
        (Some(_), Some(_)) => ApiError::unauthorized("more than one `Authorization` header"),
        (Some(value), None) if token.accepts(value.as_bytes()) => return next.run(req).await,
        (Some(_), None) => ApiError::unauthorized("invalid bearer token"),
    };
    let id = RequestId::from_headers_or_new(req.headers());
    tracing::info!(request_id = %id, method = %req.method(), path = %req.uri().path(),
        "rejected unauthenticated request");
    let mut response = id.clone().scope(async { error.into_response() }).await;
    id.tag(&mut response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_token() {
        let t = BearerToken::new("s3cret\n").unwrap();
        assert!(t.accepts(b"Bearer s3cret"));
        assert!(t.accepts(b"bearer s3cret"));
        assert!(!t.accepts(b"Bearer s3cre"));
        assert!(!t.accepts(b"Bearer s3cret2"));
        assert!(!t.accepts(b"Basic s3cret"));
        assert!(!t.accepts(b"s3cret"));
        assert!(!t.accepts(b"Bearer "));
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn empty_or_odd_tokens_are_refused() {
        assert!(matches!(
            BearerToken::new(" \n"),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            BearerToken::new("a b"),
            Err(TokenError::NotPrintable { .. })
        ));
    }
}
