//! basalt's warm pool as a node group of Kubernetes cluster-autoscaler.
//!
//! cluster-autoscaler's `externalgrpc` cloud provider talks gRPC to an external service
//! (package `clusterautoscaler.cloudprovider.v1.externalgrpc`, service `CloudProvider`).
//! This crate is that service for a basalt pool:
//!
//! - [`proto`]: the protocol, generated from `proto/externalgrpc.proto` (written for basalt,
//!   field-compatible with both generations of the published file; see its header) with
//!   protox and tonic-prost-build, server and client.
//! - [`serve`]: the server, over mutual TLS only. The client certificate must chain to the
//!   configured client CA (the pool CA); its subject common name (CN) picks the cluster
//!   ([`ClusterIdentity::client_cert_name`]). A certificate of another CA, or none, fails the
//!   handshake. A valid certificate whose CN is no cluster's gets PERMISSION_DENIED.
//! - [`NodeGroupBackend`]: what the pool controller implements.
//!
//! Each cluster sees one node group, `<pool>-<cluster>`, with the min and max of its
//! [`ClusterIdentity`]. It can only see, grow and delete its own nodes: another group's id is
//! NOT_FOUND, another cluster's node is "not managed" (group id `""`) in NodeGroupForNode and
//! PERMISSION_DENIED in NodeGroupDeleteNodes (nothing is deleted then).
//!
//! | RPC | answer |
//! | --- | --- |
//! | NodeGroups | the caller's group |
//! | NodeGroupForNode | the caller's group if the backend says the node (by provider id) is the caller's cluster's, else the empty group |
//! | NodeGroupTargetSize | [`NodeGroupBackend::target_size`] (active + promoting) |
//! | NodeGroupIncreaseSize | [`NodeGroupBackend::increase_size`]; delta must be positive and stay within max |
//! | NodeGroupDeleteNodes | [`NodeGroupBackend::delete_nodes`] after every node is checked to be the caller's |
//! | NodeGroupDecreaseTargetSize | [`NodeGroupBackend::decrease_target_size`] with -delta (delta must be negative) |
//! | NodeGroupNodes | [`NodeGroupBackend::nodes`]: provider ids, Running/Creating/Deleting, error info |
//! | NodeGroupTemplateNodeInfo | a Node built from [`NodeGroupBackend::template`] (labels, taints, cpu/memory/pods, Ready), in both the old `nodeInfo` and the new `nodeBytes` field; UNIMPLEMENTED when no template is configured, which the autoscaler reads as "build the template from a running node" (no scale-from-zero for that group) |
//! | NodeGroupGetOptions | the autoscaler's defaults with [`NodeGroupBackend::options`] applied; every duration is filled in both generations' fields |
//! | Refresh | [`NodeGroupBackend::refresh`] |
//! | GPULabel | [`service::GPU_LABEL`]; GetAvailableGPUTypes: none |
//! | PricingNodePrice, PricingPodPrice | UNIMPLEMENTED (the protocol's "optional"; the autoscaler then has no pricing, which only the price expander needs) |
//! | Cleanup | OK, nothing to release |
//!
//! The published protocol (as of this writing) has no NodeGroupForceDeleteNodes or
//! atomic-increase RPC; an autoscaler that calls an RPC this service does not know gets
//! UNIMPLEMENTED from tonic.
//!
//! # cluster-autoscaler configuration
//!
//! Run the autoscaler with `--cloud-provider=externalgrpc --cloud-config=/etc/basalt/cloud-config.yaml`.
//! The cloud-config is YAML with the keys the externalgrpc provider reads: `address`
//! (`host:port`), `cert` and `key` (its client certificate and key), `cacert` (the CA that
//! signed the server's certificate), and optionally `grpc_timeout` (a Go duration, default
//! `5s`):
//!
//! ```yaml
//! address: basalt-pool.basalt-system.svc:8086
//! cert: /etc/basalt/autoscaler/customer-a.pem
//! key: /etc/basalt/autoscaler/customer-a.key
//! cacert: /etc/basalt/autoscaler/ca.pem
//! # A promote answers within seconds; a cold start takes longer than the 5 s default.
//! grpc_timeout: 60s
//! ```
//!
//! The autoscaler checks the server's certificate against `cacert` for the host part of
//! `address`, so the server certificate needs that name as a SAN. With the pool CA
//! (`basalt pki`):
//!
//! ```text
//! basalt pki init ca/
//! # the server: serverAuth, the Service's DNS name as a SAN
//! basalt pki issue node basalt-pool --dns basalt-pool.basalt-system.svc --ca ca/ --out tls/
//! # one per cluster: clientAuth, CN = that cluster's client_cert_name
//! basalt pki issue client customer-a --ca ca/ --out customer-a/
//! ```
//!
//! The server then runs with `cert = tls/basalt-pool.pem`, `key = tls/basalt-pool.key`,
//! `client_ca = ca/ca.pem` ([`TlsPaths`]); cluster `customer-a`'s autoscaler gets
//! `customer-a/customer-a.pem`, `.key` and `ca/ca.pem` as `cert`, `key` and `cacert`.
//! A client certificate must carry the clientAuth usage: a server (node) certificate of the
//! same CA is refused as a client.
//!
//! The autoscaler sends no client certificate unless `cert` is set (it then falls back to
//! plain text); this server only speaks mutual TLS, so such an autoscaler cannot connect.

pub mod backend;
pub mod identity;
pub mod server;
pub mod service;
pub mod tls;

/// The generated protocol: messages, the `CloudProvider` server trait and client.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));

    /// The service's package, `clusterautoscaler.cloudprovider.v1.externalgrpc`.
    pub use clusterautoscaler::cloudprovider::v1::externalgrpc;
}

pub use backend::{
    BackendError, Instance, InstanceError, InstanceErrorClass, InstanceState, NodeGroupBackend,
    NodeTemplate, OptionOverrides, Taint,
};
pub use identity::{ClusterIdentity, Identities, IdentityError};
pub use server::{serve, serve_with_config, PeerIdentity, ServeError};
pub use tls::{TlsError, TlsPaths, TlsPem};
