//! The `[identity]` table: where ztail's SVID comes from (PEM files or the SPIFFE Workload API),
//! and what about those places is valid but unsafe.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::files::FilesConfig;
use super::workload::WorkloadConfig;
use crate::config::{ConfigError, Validator};

#[derive(Debug)]
pub enum IdentityConfig {
    /// PEM files written by spiffe-helper, `spire-agent api fetch x509 -write` or `certs-dev/`.
    Files(FilesConfig),
    /// The SPIFFE Workload API of a SPIRE agent.
    Spiffe(WorkloadConfig),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "source", rename_all = "lowercase")]
pub(crate) enum RawIdentity {
    Files {
        cert: PathBuf,
        key: PathBuf,
        bundle: PathBuf,
    },
    Spiffe {
        socket: Option<String>,
        hint: Option<String>,
    },
}

impl IdentityConfig {
    pub(crate) fn validate(v: &Validator, raw: RawIdentity) -> Result<IdentityConfig, ConfigError> {
        Ok(match raw {
            RawIdentity::Files { cert, key, bundle } => IdentityConfig::Files(FilesConfig {
                cert: v.path(&cert),
                key: v.path(&key),
                bundle: v.path(&bundle),
            }),
            RawIdentity::Spiffe { socket, hint } => {
                let endpoint = match socket {
                    Some(s) => s,
                    None => std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
                        v.err(
                            "identity.socket",
                            "not set and SPIFFE_ENDPOINT_SOCKET is empty: name the SPIRE agent's Workload API socket, e.g. \"unix:///tmp/spire-agent/public/api.sock\"",
                        )
                    })?,
                };
                let endpoint = workload_endpoint(v, &endpoint)
                    .map_err(|reason| v.err("identity.socket", reason))?;
                if hint.as_deref() == Some("") {
                    return Err(v.err(
                        "identity.hint",
                        "must not be empty (omit it to take the default SVID)",
                    ));
                }
                IdentityConfig::Spiffe(WorkloadConfig { endpoint, hint })
            }
        })
    }
}

/// A Workload API address in the `unix:///abs` or `tcp://ip:port` form the spiffe crate
/// takes; `unix:relative/path` is resolved against the config file's directory. TCP is
/// taken on loopback only: the Workload API is plaintext gRPC, so over a network the SVID's
/// private key would cross it in the clear, and whoever answered could hand ztail a trust
/// bundle of its own and then pose as Loki.
fn workload_endpoint(v: &Validator, endpoint: &str) -> Result<String, String> {
    let invalid = || {
        format!(
            "invalid Workload API address {endpoint:?}: expected unix:///absolute/path.sock, unix:relative/path.sock (relative to this file) or tcp://127.0.0.1:port"
        )
    };
    if let Some(rest) = endpoint.strip_prefix("tcp://") {
        let addr = rest
            .parse::<std::net::SocketAddr>()
            .map_err(|_| invalid())?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{endpoint:?} is not on loopback: the Workload API is plaintext gRPC, so ztail's private key and trust bundle would cross the network in the clear and whoever answers could hand ztail a bundle of its own; use the SPIRE agent's unix socket (mount it into the container) or tcp://127.0.0.1:port"
            ));
        }
        return Ok(endpoint.to_owned());
    }
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(invalid)?;
    if path.is_empty() || (endpoint.starts_with("unix://") && !path.starts_with('/')) {
        return Err(invalid());
    }
    Ok(format!("unix://{}", v.path(Path::new(path)).display()))
}

/// Whether others could replace the Workload API socket with one of their own (which would
/// hand ztail their SVID and trust bundle): its directory writable by its group or others, or
/// the socket or its directory owned by someone other than root, the agent (the socket's owner)
/// and ztail's user. The socket's own mode does not matter: every workload must connect to it.
pub(crate) fn socket_warning(socket: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = socket.parent()?;
    let dir_meta = std::fs::metadata(dir).ok()?;
    let agent = std::fs::symlink_metadata(socket).ok().map(|m| m.uid());
    let me = rustix::process::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me || Some(uid) == agent;
    if dir_meta.mode() & 0o022 != 0 {
        return Some(format!(
            "the Workload API socket's directory {} is writable by its group or others (mode {:o}): they could replace the socket and hand ztail an identity and trust bundle of their own (chmod go-w)",
            dir.display(),
            dir_meta.mode() & 0o777
        ));
    }
    if !trusted(dir_meta.uid()) {
        return Some(format!(
            "the Workload API socket's directory {} belongs to uid {}, neither root, the agent nor ztail's user: that user could replace the socket",
            dir.display(),
            dir_meta.uid()
        ));
    }
    None
}
