//! The Hetzner Cloud provider: servers created from the newest snapshot that matches the
//! pool's selector, through the same client as `basalt hcloud` (its retries, rate-limit
//! waits and lost-answer handling).

use crate::config::HetznerSettings;
use crate::provider::{CreateServer, Image, Provider, ProviderError, Server, LABEL_POOL};
use basalt_hcloud::api;
use basalt_hcloud::client::{ApiError, Client, Timing};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KIND: &str = "hetzner";
/// The lock's holder and last heartbeat (UNIX seconds), as labels on the lock key.
pub const LABEL_LOCK_HOLDER: &str = "basalt.io/lock-holder";
pub const LABEL_LOCK_HEARTBEAT: &str = "basalt.io/lock-heartbeat";
/// Snapshot label with the image's version (what `basalt hcloud upload` sets).
const LABEL_VERSION: &str = "basalt.io/version";

pub struct Hetzner {
    client: Client,
    settings: HetznerSettings,
}

impl std::fmt::Debug for Hetzner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hetzner")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Hetzner {
    /// A provider on the endpoint of `settings` (else `HCLOUD_ENDPOINT`, else Hetzner's).
    pub fn new(settings: &HetznerSettings, timing: Timing) -> Result<Hetzner, ProviderError> {
        let endpoint = settings
            .endpoint
            .clone()
            .unwrap_or_else(basalt_hcloud::client::endpoint_from_env);
        let client =
            Client::new(&endpoint, &settings.token, timing).map_err(|e| ProviderError {
                provider: KIND,
                what: format!("set up the HTTPS client: {e}"),
                transient: false,
            })?;
        Ok(Hetzner {
            client,
            settings: settings.clone(),
        })
    }

    fn lock_name(pool: &str) -> String {
        format!("basalt-pool-lock-{pool}")
    }

    async fn network_id(&self, network: &str) -> Result<u64, ProviderError> {
        if let Ok(id) = network.parse::<u64>() {
            return Ok(id);
        }
        let found = self.client.networks(Some(network)).await.map_err(err)?;
        found
            .into_iter()
            .find(|n| n.name == network)
            .map(|n| n.id)
            .ok_or_else(|| ProviderError {
                provider: KIND,
                what: format!("no private network named {network:?}"),
                transient: false,
            })
    }
}

/// 429, 5xx, lost answers and the API's "try again" codes are transient: the controller
/// tries again on its next pass. Everything else is reported.
fn err(e: ApiError) -> ProviderError {
    let transient = match &e {
        ApiError::Transport { .. }
        | ApiError::Exhausted { .. }
        | ApiError::ActionTimeout { .. }
        | ApiError::Cancelled => true,
        ApiError::Api { status, code, .. } => {
            *status == 429
                || *status >= 500
                || matches!(
                    code.as_str(),
                    "rate_limit_exceeded" | "locked" | "conflict" | "timeout" | "unavailable"
                )
        }
        _ => false,
    };
    ProviderError {
        provider: KIND,
        what: e.to_string(),
        transient,
    }
}

fn parse_id(id: &str) -> Result<u64, ProviderError> {
    id.parse().map_err(|_| ProviderError {
        provider: KIND,
        what: format!("{id:?} is not a Hetzner server id"),
        transient: false,
    })
}

fn parse_time(s: &str) -> SystemTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .unwrap_or(UNIX_EPOCH)
}

fn server(s: api::Server) -> Server {
    let api = s
        .public_net
        .ipv4
        .as_ref()
        .and_then(|v4| v4.ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, basalt_api::node::DEFAULT_PORT));
    Server {
        id: s.id.to_string(),
        name: s.name,
        labels: s.labels,
        created: parse_time(&s.created),
        api,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A public key nobody holds the private half of: the lock key must be a valid key for the
/// API, and is never given to a server.
fn throwaway_public_key() -> Result<String, ProviderError> {
    let seed: [u8; 32] = rand::random();
    let key = russh::keys::PrivateKey::from(
        russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed),
    );
    key.public_key().to_openssh().map_err(|e| ProviderError {
        provider: KIND,
        what: format!("encode the lock's public key: {e}"),
        transient: false,
    })
}

impl Provider for Hetzner {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn provider_id(&self, server: &Server) -> String {
        format!("hcloud://{}", server.id)
    }

    async fn images(&self) -> Result<Vec<Image>, ProviderError> {
        let mut list = self
            .client
            .images(Some(&self.settings.image_selector))
            .await
            .map_err(err)?;
        list.retain(|i| i.status == "available");
        let mut images: Vec<Image> = list
            .into_iter()
            .map(|i| Image {
                id: i.id.to_string(),
                created: parse_time(&i.created),
                version: i.labels.get(LABEL_VERSION).cloned(),
            })
            .collect();
        // The API sorts already; sorting again keeps the promise without trusting it.
        images.sort_by_key(|i| std::cmp::Reverse(i.created));
        Ok(images)
    }

    async fn servers(&self, pool: &str) -> Result<Vec<Server>, ProviderError> {
        let selector = format!("{LABEL_POOL}={pool}");
        let list = self.client.servers(Some(&selector)).await.map_err(err)?;
        Ok(list
            .into_iter()
            .filter(|s| s.status != "deleting")
            .map(server)
            .collect())
    }

    async fn create(&self, req: &CreateServer) -> Result<Server, ProviderError> {
        let body = api::CreateServer {
            name: req.name.clone(),
            server_type: self.settings.server_type.clone(),
            image: req.image.clone(),
            location: self.settings.location.clone(),
            start_after_create: true,
            labels: req.labels.clone(),
            user_data: Some(req.user_data.clone()),
        };
        // A lost answer is resolved by the client, by the server's unique name.
        self.client
            .create_server(&body)
            .await
            .map(server)
            .map_err(err)
    }

    async fn set_labels(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        self.client
            .update_server_labels(parse_id(id)?, labels)
            .await
            .map(drop)
            .map_err(err)
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        self.client.delete_server(parse_id(id)?).await.map_err(err)
    }

    /// The lock is an SSH key named `basalt-pool-lock-<pool>` whose labels hold the holder
    /// and its heartbeat. Why an SSH key: it is free, it carries labels that can be
    /// replaced (`PUT /ssh_keys/{id}`), and its name is unique per project, so creating it
    /// is an atomic test-and-set (a second creator gets `uniqueness_error`). Its private
    /// half is thrown away and it is never given to a server. Taking over a stale lock is
    /// a plain write: two controllers taking over the same stale lock in the same second
    /// could both win; the pool runs as one replica (`Recreate`), the lock is the guard
    /// against a second one started by mistake, not a consensus protocol.
    async fn lock(&self, pool: &str, holder: &str, ttl: Duration) -> Result<bool, ProviderError> {
        let name = Self::lock_name(pool);
        let labels = BTreeMap::from([
            (LABEL_POOL.to_owned(), pool.to_owned()),
            (LABEL_LOCK_HOLDER.to_owned(), holder.to_owned()),
            (LABEL_LOCK_HEARTBEAT.to_owned(), unix_now().to_string()),
        ]);
        let existing = self.client.ssh_key_by_name(&name).await.map_err(err)?;
        let Some(key) = existing else {
            let req = api::CreateSshKey {
                name: name.clone(),
                public_key: throwaway_public_key()?,
                labels,
            };
            return match self.client.create_ssh_key(&req).await {
                Ok(k) => Ok(k.labels.get(LABEL_LOCK_HOLDER).map(String::as_str) == Some(holder)),
                // Another controller created it between our look and our create.
                Err(e) if e.code() == Some("uniqueness_error") => Ok(false),
                Err(e) => Err(err(e)),
            };
        };
        let theirs = key.labels.get(LABEL_LOCK_HOLDER).map(String::as_str);
        let beat = key
            .labels
            .get(LABEL_LOCK_HEARTBEAT)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let fresh = unix_now().saturating_sub(beat) < ttl.as_secs().max(1);
        if theirs != Some(holder) && fresh {
            return Ok(false);
        }
        self.client
            .update_ssh_key_labels(key.id, &labels)
            .await
            .map_err(err)?;
        Ok(true)
    }

    async fn attach_network(&self, id: &str, network: &str) -> Result<(), ProviderError> {
        let server = parse_id(id)?;
        let net = self.network_id(network).await?;
        self.client
            .attach_to_network(server, net)
            .await
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_transient_when_trying_again_can_help() {
        let api = |status: u16, code: &str| ApiError::Api {
            method: reqwest_method(),
            path: "/servers".into(),
            status,
            code: code.into(),
            message: "m".into(),
        };
        assert!(err(api(429, "rate_limit_exceeded")).transient);
        assert!(err(api(503, "unavailable")).transient);
        assert!(err(api(423, "locked")).transient);
        assert!(!err(api(400, "invalid_input")).transient);
        assert!(!err(api(403, "forbidden")).transient);
        assert!(
            err(ApiError::Exhausted {
                method: reqwest_method(),
                path: "/servers".into(),
                attempts: 3,
                last: "HTTP 502".into()
            })
            .transient
        );
        assert!(!err(ApiError::Missing { what: "x".into() }).transient);
    }

    fn reqwest_method() -> reqwest::Method {
        reqwest::Method::POST
    }

    #[test]
    fn created_times_parse_with_offsets() {
        let t = parse_time("2026-11-30T12:00:00+00:00");
        let z = parse_time("2026-11-30T12:00:00Z");
        assert_eq!(t, z);
        assert!(t > UNIX_EPOCH);
        assert_eq!(parse_time("yesterday"), UNIX_EPOCH);
    }

    #[test]
    fn the_lock_key_is_a_valid_openssh_key() {
        let k = throwaway_public_key().expect("key");
        assert!(k.starts_with("ssh-ed25519 "), "{k}");
        assert_ne!(k, throwaway_public_key().expect("key"));
    }
}
