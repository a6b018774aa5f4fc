//! The Kubernetes client, built from a kubeconfig and context.

use std::path::{Path, PathBuf};

use hyper::header::{self, HeaderValue};

use super::FIELD_MANAGER;

/// Why the Kubernetes client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find a kubeconfig (give --kubeconfig or set KUBECONFIG)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot set up the Kubernetes client")]
    Build(#[source] kube::Error),
}

/// Builds the Kubernetes client from the kubeconfig named, or the usual places; returns it
/// with the API server's URL, which messages name (a host name that does not resolve, a
/// server that does not answer).
pub async fn client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<(kube::Client, String), ClientError> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let named = kubeconfig
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from));
    if let Some(path) = named {
        warn_if_readable_by_others(&path);
    }
    let mut config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClientError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None if context.is_some() => {
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: "(KUBECONFIG)".into(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    let server = config.cluster_url.to_string();
    config.headers.push((header::USER_AGENT, user_agent()));
    let client = kube::Client::try_from(config).map_err(ClientError::Build)?;
    Ok((client, server))
}

/// `kube-port-forward/<version>`: the API server names the manager of a write that gives no
/// `fieldManager` (the events kube-runtime posts) by the User-Agent up to its first `/`.
fn user_agent() -> HeaderValue {
    HeaderValue::from_str(&format!("{FIELD_MANAGER}/{}", env!("CARGO_PKG_VERSION")))
        .expect("a printable User-Agent")
}

/// A kubeconfig holds credentials: say so when other users can read it. Only the path and
/// the mode are logged, never the contents.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "the kubeconfig is readable by other users and holds credentials: chmod 600 it"
            );
        }
    }
}
